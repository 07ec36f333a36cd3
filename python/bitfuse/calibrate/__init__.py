"""Calibration: turn float weights into PackedWeights (see core.py for the steps)."""

from .budget import allocate_ranks, quantize_with_ranks, rank_params
from .collect import collect
from .core import METHODS, activation_norms, calibrate
from .errors import BudgetError, CalibrationError
from .gptq import ROUNDINGS
from .report import layer_report
from .stats import ActivationStats

__all__ = ["calibrate", "collect", "layer_report", "ActivationStats", "CalibrationError",
           "BudgetError", "activation_norms", "METHODS", "ROUNDINGS", "allocate_ranks", "quantize_with_ranks",
           "rank_params"]
