"""Target hardware profiles: the per-device defaults the calibrator and the kernels consult.

Figures are vendor numbers from shared/hardware.md; benchmarks measure their own bandwidth and
never quote these as measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class TargetProfile:
    name: str
    arch: Optional[str]          # "sm_87" etc.; None for the CPU
    dram_gbps: float             # vendor DRAM bandwidth, GB/s
    sms: int
    smem_per_sm_kb: int
    default_group_size: int      # group size the kernels on this device prefer
    description: str


PROFILES: Dict[str, TargetProfile] = {
    "orin": TargetProfile("orin", "sm_87", 204.8, 16, 164, 64, "Jetson AGX Orin 64GB"),
    "rtx30": TargetProfile("rtx30", "sm_86", 936.0, 82, 100, 128, "RTX 3090"),
    "rtx40": TargetProfile("rtx40", "sm_89", 1008.0, 128, 100, 128, "RTX 4090"),
    "h100": TargetProfile("h100", "sm_90", 3350.0, 132, 228, 128, "H100 80GB"),
    "cpu": TargetProfile("cpu", None, 0.0, 0, 0, 128, "CPU (torch reference path)"),
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
