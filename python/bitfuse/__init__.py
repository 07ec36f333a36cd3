"""bitfuse: packed 2/3/4-bit weight kernels with fused residual, mixed-precision, low-rank and
sparse branches, as nn.Module drop-ins.

    import bitfuse
    cfg = bitfuse.QuantConfig(bits=4, group_size=128)
    bitfuse.quantize_(model, cfg)
"""

from .version import __version__
from .config import ConfigError, QuantConfig
from .format import FORMAT_VERSION, FormatError, PackedWeight
from .dispatch import BackendUnavailableError, backends
from .calibrate import CalibrationError, calibrate
from . import ops  # registers torch.ops.bitfuse.*
from .nn import QuantLinear, set_reference_cache
from .api import quantize_
from .io import CheckpointError, load_quantized, save_quantized
from .lora import LoraLoadReport, list_loras, load_lora, remove_lora, set_lora_scale

__all__ = [
    "__version__", "QuantConfig", "ConfigError", "PackedWeight", "FormatError", "FORMAT_VERSION",
    "backends", "BackendUnavailableError", "calibrate", "CalibrationError", "QuantLinear",
    "set_reference_cache", "quantize_", "save_quantized", "load_quantized", "CheckpointError",
    "load_lora", "set_lora_scale", "remove_lora", "list_loras", "LoraLoadReport",
]
