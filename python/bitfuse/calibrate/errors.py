"""Errors raised by calibration (kept apart so every calibration module can raise them)."""

from ..config import ConfigError


class CalibrationError(ValueError):
    """A weight or calibration input that cannot be quantized as asked."""


class BudgetError(CalibrationError, ConfigError):
    """An avg_bits budget that no allowed bit-class split of this layer can meet."""
