"""Target hardware profiles: the per-device defaults the calibrator and the kernels consult.

Figures are vendor numbers from shared/hardware.md; benchmarks measure their own bandwidth and
never quote these as measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# 3-bit code layouts. "planes" (docs/FORMAT.md: each run of 32 codes as a 2-bit word pair plus a
# 1-bit plane, exactly 3 bpw) is the only one bitfuse implements; the field exists so a profile
# states which layout its kernels expect rather than leaving it implicit.
LAYOUTS_3BIT = ("planes",)


@dataclass(frozen=True)
class TargetProfile:
    """Per-device preferences. What they mean for calibration and for the kernels:

    default_group_size: the group size the kernels on this device run best with (scales stay in
        L1/shared memory; Orin's small DRAM bandwidth favours g64 for accuracy per byte). It is a
        recommendation (profile_defaults); QuantConfig.group_size stays what the user sets.
    layout_3bit: the 3-bit code layout the kernels read ("planes").
    kernel_preference: backends (bitfuse.dispatch.BACKENDS) in the order this device prefers them;
        dispatch still picks the first one that is available for the tensor's device.
    """
    name: str
    arch: Optional[str]          # "sm_87" etc.; None for the CPU
    dram_gbps: float             # vendor DRAM bandwidth, GB/s
    sms: int
    smem_per_sm_kb: int
    default_group_size: int      # group size the kernels on this device prefer
    description: str
    layout_3bit: str = "planes"
    kernel_preference: Tuple[str, ...] = ("cuda", "triton", "torch")


PROFILES: Dict[str, TargetProfile] = {
    "orin": TargetProfile("orin", "sm_87", 204.8, 16, 164, 64, "Jetson AGX Orin 64GB"),
    "rtx30": TargetProfile("rtx30", "sm_86", 936.0, 82, 100, 128, "RTX 3090"),
    "rtx40": TargetProfile("rtx40", "sm_89", 1008.0, 128, 100, 128, "RTX 4090"),
    "h100": TargetProfile("h100", "sm_90", 3350.0, 132, 228, 128, "H100 80GB"),
    "cpu": TargetProfile("cpu", None, 0.0, 0, 0, 128, "CPU (torch reference path)",
                         kernel_preference=("torch",)),
}

_BY_CAPABILITY = {(8, 7): "orin", (8, 6): "rtx30", (8, 9): "rtx40", (9, 0): "h100"}


def resolve_target(target: str) -> str:
    """Turn "auto" into a concrete profile name from the visible device (or "cpu")."""
    if target != "auto":
        if target not in PROFILES:
            raise ValueError(f"unknown target {target!r}; known: {sorted(PROFILES)} or 'auto'")
        return target
    import torch

    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        # Unknown GPUs take the closest family: Hopper and newer -> h100, else rtx40.
        return _BY_CAPABILITY.get(cap, "h100" if cap >= (9, 0) else "rtx40")
    return "cpu"



def profile_defaults(target: str = "auto") -> dict:
    """What QuantConfig(target=...) means, made explicit: the resolved profile name and its
    preferences, as a JSON-able dict.

    keys: target (resolved, never "auto"), group_size (recommended; QuantConfig's own
    group_size default is unchanged and always wins when set), layout_3bit, kernel_preference
    (list of backend names, most preferred first), arch, dram_gbps, description.
    calibrate() records the resolved name in every PackedWeight's `target` metadata field.
    """
    name = resolve_target(target)
    p = PROFILES[name]
    return {
        "target": name, "group_size": p.default_group_size, "layout_3bit": p.layout_3bit,
        "kernel_preference": list(p.kernel_preference), "arch": p.arch,
        "dram_gbps": p.dram_gbps, "description": p.description,
    }
