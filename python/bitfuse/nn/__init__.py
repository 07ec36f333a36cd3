"""nn.Module drop-ins backed by packed low-bit weights."""

from .conv import QuantConv2d, conv_unsupported_reason
from .embedding import QuantEmbedding, embedding_unsupported_reason
from .linear import LoraInfo, QuantLinear, set_reference_cache

__all__ = ["QuantLinear", "QuantConv2d", "QuantEmbedding", "LoraInfo", "conv_unsupported_reason",
           "embedding_unsupported_reason", "set_reference_cache"]
