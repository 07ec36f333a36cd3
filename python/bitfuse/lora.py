"""LoRA adapters on a quantized model: load, rescale, swap and remove them without repacking.

An adapter lives in each QuantLinear / QuantConv2d's low-rank branch (docs/FORMAT.md §7): its
factors are appended along r, its strength is in lr_scale. This module reads LoRA state dicts in
the common key formats and applies them to every matching quantized layer:

  * PEFT / diffusers:       <mod>.lora_A.weight, <mod>.lora_B.weight  (+ <mod>.alpha | <mod>.lora_alpha)
  * diffusers, older:       <mod>.lora.down.weight, <mod>.lora.up.weight,
                            <mod>.lora_linear_layer.{down,up}.weight (text encoders), and the
                            attention-processor form <attn>.processor.<to_q|to_k|to_v|to_out>_lora.{down,up}.weight
  * kohya (sd-scripts):     <mod>.lora_down.weight, <mod>.lora_up.weight, <mod>.alpha, with <mod>
                            dotted or underscored (lora_unet_down_blocks_0_attentions_0_proj_in)

diffusers' own `pipe.load_lora_weights` goes through PEFT, which wraps nn.Linear / nn.Conv2d and
does not know QuantLinear (its dispatch raises "Target module … is not supported"). Use
`load_lora` here (or bitfuse.integrations.diffusers.load_lora for a pipeline).

PEFT files keep lora_alpha in adapter_config.json, not in the weights: pass alpha= for them.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .nn import QuantLinear
from .nn.linear import LoraInfo

# (key suffix, role). Longest first, so ".lora.down.weight" is not read as ".down.weight" of
# a module named "...lora".
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_alpha", "alpha"), (".alpha", "alpha"),
)
# diffusers' attention-processor LoRA (LoRAAttnProcessor): to_out_lora targets to_out.0.
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# Keys this loader recognises but cannot apply (DoRA magnitudes, LoRA biases, LyCORIS variants).
_UNSUPPORTED = (
    (re.compile(r"(\.lora_magnitude_vector|\.dora_scale)(\.weight)?$"), "DoRA is not supported (only plain LoRA)"),
    (re.compile(r"\.lora_B\.bias$|\.lora_up\.bias$"), "LoRA biases are not supported"),
    (re.compile(r"\.(hada_|lokr_|oft_|lora_mid)"), "LyCORIS (LoHa/LoKr/OFT/LoCon-mid) is not supported"),
)
# Dotted prefixes that LoRA files put before the module name; stripped when the model itself has
# no such module (the unstripped name is always tried first). "text_model." is CLIPTextModel's
# inner module in transformers 4, which SD LoRA files name; transformers 5 dropped that level.
STRIP_PREFIXES = ("base_model.model.", "unet.", "transformer.", "text_encoder.", "text_model.")
# kohya's underscored names: prefix + the module's dotted name with '.' -> '_'.
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te1_", "lora_te2_", "lora_te_")


@dataclass
class LoraLoadReport:
    """What load_lora did: the modules that got the adapter, and each key it left out, with why."""

    adapter_name: str
    applied: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"LoRA '{self.adapter_name}': applied to {len(self.applied)} module(s)"
        if self.skipped:
            s += f", skipped {len(self.skipped)} key(s): " + "; ".join(f"{k}: {why}" for k, why in self.skipped[:10])
            if len(self.skipped) > 10:
                s += f"; … and {len(self.skipped) - 10} more"
        return s


@dataclass
class _Group:
    """The keys of one LoRA target as found in the file (before resolving the module)."""

    down: Optional[Tuple[str, torch.Tensor]] = None
    up: Optional[Tuple[str, torch.Tensor]] = None
    alpha: Optional[Tuple[str, torch.Tensor]] = None

    def keys(self) -> List[str]:
        return [p[0] for p in (self.down, self.up, self.alpha) if p is not None]


@dataclass
class _Plan:
    """Everything checked and converted, nothing applied: (fqn, layer, down16, up16, info, keys)."""

    adapter_name: str
    items: List[tuple] = field(default_factory=list)
    problems: List[Tuple[str, str]] = field(default_factory=list)  # (key, reason)


def _load_source(source) -> Dict[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        from safetensors.torch import load_file

        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_lora: no LoRA file at {path!r}")
        return load_file(path)
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"load_lora: source must be a dict of tensors or a .safetensors path, got {type(source).__name__}")


def _split_key(key: str):
    """(module string, role) for a LoRA key, or (None, reason) for one this loader cannot use."""
    m = _PROCESSOR.match(key)
    if m:
        attn, proj, role = m.groups()
        return f"{attn}.{'to_out.0' if proj == 'to_out' else proj}", role
    for pattern, why in _UNSUPPORTED:
        if pattern.search(key):
            return None, why
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None, ("not a LoRA key this loader knows (expected lora_A/lora_B, lora.down/lora.up, "
                  "lora_down/lora_up, alpha)")


class _Resolver:
    """Maps a LoRA file's module string to a module of the model."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self._underscored = None

    def underscored(self) -> Dict[str, List[str]]:
        if self._underscored is None:
            self._underscored = {}
            for name in self.modules:
                if name:
                    self._underscored.setdefault(name.replace(".", "_"), []).append(name)
        return self._underscored

    def resolve(self, mod: str) -> Tuple[Optional[str], Optional[str]]:
        """(fqn, None) or (None, why not)."""
        candidates = [mod]
        stripped = mod
        while True:
            p = next((p for p in STRIP_PREFIXES if stripped.startswith(p)), None)
            if p is None:
                break
            stripped = stripped[len(p):]
            candidates.append(stripped)
        for c in candidates:
            if c in self.modules and c:
                return c, None
        for c in candidates:
            p = next((p for p in KOHYA_PREFIXES if c.startswith(p)), None)
            if p is None or "." in c:
                continue
            rest = c[len(p):]
            hits = self.underscored().get(rest, [])
            if not hits and rest.startswith("text_model_"):  # as for "text_model." above
                hits = self.underscored().get(rest[len("text_model_"):], [])
            if len(hits) == 1:
                return hits[0], None
            if len(hits) > 1:
                return None, f"kohya name '{c}' is ambiguous in this model: {hits}"
        return None, "matches no module of the model"


def plan_lora(model: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str = "default",
              scale: float = 1.0, alpha: Optional[float] = None, where: str = "") -> _Plan:
    """Check every key of `state` against `model` and convert the factors; apply nothing.
    `where` prefixes module names in messages (a pipeline component)."""
    plan = _Plan(adapter_name)
    groups: "OrderedDict[str, _Group]" = OrderedDict()
    for key, t in state.items():
        mod, role = _split_key(key)
        if mod is None:
            plan.problems.append((key, role))
            continue
        if not isinstance(t, torch.Tensor):
            plan.problems.append((key, f"value is a {type(t).__name__}, not a tensor"))
            continue
        g = groups.setdefault(mod, _Group())
        if getattr(g, role) is not None:
            plan.problems.append((key, f"duplicate {role} for '{mod}' (also {getattr(g, role)[0]})"))
            continue
        setattr(g, role, (key, t))

    resolver = _Resolver(model)
    targets: Dict[str, str] = {}  # fqn -> the module string that claimed it
    for mod, g in groups.items():
        keys = g.keys()

        def bad(why):
            plan.problems.extend((k, why) for k in keys)

        if g.down is None or g.up is None:
            missing = [r for r, p in (("down (lora_A/lora_down)", g.down), ("up (lora_B/lora_up)", g.up)) if p is None]
            bad(f"'{mod}' has no {' and no '.join(missing)} half")
            continue
        fqn, why = resolver.resolve(mod)
        if fqn is None:
            bad(f"'{mod}' {why}")
            continue
        name = f"{where}{fqn}"
        layer = resolver.modules[fqn]
        if not isinstance(layer, QuantLinear):
            bad(f"'{name}' is a {type(layer).__name__}, not a QuantLinear/QuantConv2d (a layer left "
                f"unquantized?): LoRA is applied to quantized layers only")
            continue
        if fqn in targets:
            bad(f"'{name}' is also targeted by '{targets[fqn]}'")
            continue
        targets[fqn] = mod
        a = alpha
        if a is None and g.alpha is not None:
            a = float(g.alpha[1].float().reshape(-1)[0]) if g.alpha[1].numel() == 1 else None
            if a is None:
                bad(f"alpha of '{mod}' must hold one value, got shape {tuple(g.alpha[1].shape)}")
                continue
        try:
            down16, up16, info = layer._prepare_lora(adapter_name, g.down[1], g.up[1], a, scale, where=name)
        except (ValueError, TypeError) as e:
            bad(str(e))
            continue
        plan.items.append((name, layer, down16, up16, info, keys))
    return plan


def _raise_or_skip(problems: List[Tuple[str, str]], strict: bool, adapter_name: str) -> None:
    if strict and problems:
        lines = "\n".join(f"  - {k}: {why}" for k, why in problems[:10])
        more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"load_lora('{adapter_name}'): {len(problems)} problem(s); nothing was applied "
                         f"(strict=False applies what it can):\n{lines}{more}")


def apply_plans(plans: List[_Plan], report: LoraLoadReport) -> LoraLoadReport:
    """Apply checked plans; if anything still fails, undo what was applied (no half-loaded model)."""
    done = []
    try:
        for plan in plans:
            for name, layer, down16, up16, info, _ in plan.items:
                layer._append_lora(down16, up16, info)
                done.append((layer, info.name))
                report.applied.append(name)
    except BaseException:
        for layer, adapter in reversed(done):
            layer.remove_lora(adapter)
        raise
    return report


def load_lora(model: nn.Module, source, adapter_name: str = "default", scale: float = 1.0, *,
              alpha: Optional[float] = None, strict: bool = True) -> LoraLoadReport:
    """Apply a LoRA (a dict of tensors, or a .safetensors path) to the model's quantized layers
    as adapter `adapter_name` at strength `scale`.

    alpha: a float for every module, or None (each module's `alpha` key if the file has one,
    else its rank: a factor of 1). strict=True: any key that matches no module, targets a layer
    that is not a QuantLinear/QuantConv2d, lacks its other half, or has a wrong shape or a
    non-finite / beyond-fp16 value raises one ValueError listing the problems, and nothing is
    applied. strict=False applies the rest and lists what it left out in the report.
    """
    state = _load_source(source)
    plan = plan_lora(model, state, adapter_name, scale, alpha)
    _raise_or_skip(plan.problems, strict, adapter_name)
    report = LoraLoadReport(adapter_name, skipped=list(plan.problems))
    return apply_plans([plan], report)


def _quant_layers(model: nn.Module):
    return [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, QuantLinear)]


def _with_adapter(model: nn.Module, adapter_name: str):
    hits = [(fqn, m) for fqn, m in _quant_layers(model) if adapter_name in m._loras]
    if not hits:
        raise KeyError(f"no quantized layer of the model has a LoRA adapter '{adapter_name}'; "
                       f"loaded: {list(list_loras(model))}")
    return hits


def set_lora_scale(model: nn.Module, adapter_name: str, scale: float) -> List[str]:
    """Set an adapter's strength on every layer that has it, in place (lr_scale only: CUDA graphs
    and compiled models keep working). Returns the module names changed."""
    hits = _with_adapter(model, adapter_name)
    for _, m in hits:  # check every layer first: a bad scale must not leave a mix of strengths
        m._rescaled(adapter_name, scale)
    for _, m in hits:
        m.set_lora_scale(adapter_name, scale)
    return [fqn for fqn, _ in hits]


def remove_lora(model: nn.Module, adapter_name: str) -> List[str]:
    """Remove an adapter from every layer that has it. Returns the module names changed."""
    hits = _with_adapter(model, adapter_name)
    for _, m in hits:
        m.remove_lora(adapter_name)
    return [fqn for fqn, _ in hits]


def list_loras(model: nn.Module) -> "OrderedDict[str, OrderedDict[str, LoraInfo]]":
    """adapter name -> {module name: LoraInfo (name, offset, rank, alpha, scale)}, adapters in the
    order they were first met."""
    out: "OrderedDict[str, OrderedDict[str, LoraInfo]]" = OrderedDict()
    for fqn, m in _quant_layers(model):
        for name, info in m._loras.items():
            out.setdefault(name, OrderedDict())[fqn] = info
    return out


__all__ = ["LoraLoadReport", "load_lora", "set_lora_scale", "remove_lora", "list_loras", "LoraInfo"]
