"""Calibration: turn float weights into PackedWeights (see core.py for the steps)."""

from .core import CalibrationError, activation_norms, calibrate

__all__ = ["calibrate", "CalibrationError", "activation_norms"]
