"""nn.Module drop-ins backed by packed low-bit weights."""

from .linear import QuantLinear, set_reference_cache

__all__ = ["QuantLinear", "set_reference_cache"]
