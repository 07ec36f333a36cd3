"""save_quantized / load_quantized: one safetensors file plus JSON metadata, never pickle.

See docs/FORMAT.md §11 for the file layout.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Dict

import torch
import torch.nn as nn

from .format import FORMAT_VERSION, FormatError
from .nn import QuantConv2d, QuantEmbedding, QuantLinear
from .version import __version__

META_KEY = "bitfuse"


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, corrupted, of another version, or for another model."""


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()) if t.numel() else 0


def save_quantized(model: nn.Module, path: str) -> None:
    """Write the whole model state (packed layers and every other parameter/buffer) to `path`.

    The file is written under a temporary name and renamed, so an interrupted save never
    leaves a half-written checkpoint at `path`.
    """
    from safetensors.torch import save_file

    layers = {fqn: _layer_meta(m) for fqn, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no QuantLinear layers; run bitfuse.quantize_ first")
    tensors: Dict[str, torch.Tensor] = {}
    seen = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        # safetensors refuses shared storage (tied weights); each name gets its own copy.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        tensors[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen[key] = name
    meta = {
        "format_version": FORMAT_VERSION,
        "bitfuse_version": __version__,
        "layers": layers,
        "crc32": {name: _crc(t) for name, t in tensors.items()},
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bitfuse-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _layer_meta(m: QuantLinear) -> dict:
    meta = m.packed.meta()
    if isinstance(m, QuantConv2d):
        meta["module"], meta["conv"] = "conv2d", m.conv_meta()
    elif isinstance(m, QuantEmbedding):
        meta["module"], meta["embedding"] = "embedding", m.embedding_meta()
    else:
        meta["module"] = "linear"
    return meta


def read_metadata(path: str) -> dict:
    """The bitfuse JSON metadata of a checkpoint, checked for presence and version."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise CheckpointError(f"checkpoint {path!r} is truncated or not a safetensors file: {e}") from e
    if raw is None:
        raise CheckpointError(f"checkpoint {path!r} has no '{META_KEY}' metadata: not a bitfuse checkpoint")
    try:
        meta = json.loads(raw)
        version = meta["format_version"]
        meta["layers"], meta["crc32"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r} has malformed bitfuse metadata: {e!r}") from e
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format_version {version!r}; this bitfuse "
            f"({__version__}) reads version {FORMAT_VERSION}"
            + (" (version 1 stored codes in column order, version 2 in the mma slot order of "
               "docs/FORMAT.md §3.1: re-quantize the float model to convert)" if version == 1 else "")
        )
    return meta


def load_quantized(model: nn.Module, path: str, device=None) -> nn.Module:
    """Quantize a float `model` (the original architecture) in place from a checkpoint.

    Every layer recorded in the file must exist in the model as an nn.Linear (nn.Conv2d, nn.Embedding) of the same shape
    and bias; every tensor must match in name, shape and checksum. If anything fails, the model
    is left as it was. `device`, if given, is where the model is moved afterwards. Returns the model.
    """
    meta = read_metadata(path)
    swaps = []  # (parent, child name, old module) to restore on failure
    try:
        _swap_layers(model, meta, swaps)
        _load_state(model, meta, path)
    except BaseException:
        for parent, child, old in reversed(swaps):
            setattr(parent, child, old)
        raise
    return model.to(device) if device is not None else model


def _swap_layers(model: nn.Module, meta: dict, swaps: list) -> None:
    for fqn, lmeta in meta["layers"].items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise CheckpointError(f"checkpoint layer '{fqn}' does not exist in this model") from None
        kind = lmeta.get("module", "linear")
        is_conv = kind == "conv2d"
        want = {"conv2d": nn.Conv2d, "embedding": nn.Embedding}.get(kind, nn.Linear)
        if not isinstance(old, want):
            raise CheckpointError(f"checkpoint layer '{fqn}' is a {kind} layer, the model has {type(old).__name__}")
        if kind == "embedding":
            shape = (lmeta.get("out_features"), lmeta.get("in_features"))
            if (old.num_embeddings, old.embedding_dim) != shape:
                raise CheckpointError(f"checkpoint embedding '{fqn}' is {shape[0]} x {shape[1]}, the model's is "
                                      f"{old.num_embeddings} x {old.embedding_dim}: architecture mismatch")
        elif is_conv:
            c = lmeta.get("conv") or {}
            got = {"in_channels": old.in_channels, "kernel_size": list(old.kernel_size),
                   "stride": list(old.stride), "padding": list(old.padding), "dilation": list(old.dilation)}
            if got != c or old.out_channels != lmeta.get("out_features"):
                raise CheckpointError(f"checkpoint conv '{fqn}' is {c} -> {lmeta.get('out_features')}, "
                                      f"the model's is {got} -> {old.out_channels}: architecture mismatch")
        else:
            shape = (lmeta.get("out_features"), lmeta.get("in_features"))
            if (old.out_features, old.in_features) != shape:
                raise CheckpointError(
                    f"checkpoint layer '{fqn}' is {shape[1]} -> {shape[0]}, the model's is "
                    f"{old.in_features} -> {old.out_features}: architecture mismatch"
                )
        has_bias = "bias" in lmeta.get("tensors", [])
        if (getattr(old, "bias", None) is not None) != has_bias:
            raise CheckpointError(f"checkpoint layer '{fqn}' {'has' if has_bias else 'has no'} bias, the model's does not match")
        try:
            new = {"conv2d": QuantConv2d, "embedding": QuantEmbedding}.get(kind, QuantLinear).from_meta(lmeta)
            if kind == "embedding":
                new.out_dtype = old.weight.dtype  # lookups return the dtype of the model loaded into
        except (FormatError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint layer '{fqn}': {e}") from e
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        swaps.append((parent, child, old))
        setattr(parent, child, new)


def _load_state(model: nn.Module, meta: dict, path: str) -> None:
    from safetensors import safe_open

    expected = model.state_dict()
    state = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing, unexpected = set(expected) - names, names - set(expected)
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint {path!r} does not match the model: missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]} (architecture mismatch)"
                )
            for name in names:
                t = f.get_tensor(name)
                if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
                    raise CheckpointError(
                        f"checkpoint tensor '{name}' is {t.dtype} {tuple(t.shape)}, the model expects "
                        f"{expected[name].dtype} {tuple(expected[name].shape)}"
                    )
                if _crc(t) != meta["crc32"].get(name):
                    raise CheckpointError(f"checkpoint tensor '{name}' fails its CRC check: the file is corrupted")
                state[name] = t
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} could not be read (truncated or corrupted?): {e}") from e
    # Check every packed layer's values before anything in the model is overwritten.
    for fqn in meta["layers"]:
        packed = model.get_submodule(fqn).packed
        packed.tensors = {n: state[f"{fqn}.{n}"] for n in packed.tensors}
        try:
            packed.validate()
        except FormatError as e:
            raise CheckpointError(f"checkpoint layer '{fqn}' is inconsistent: {e}") from e
    model.load_state_dict(state, strict=True)
