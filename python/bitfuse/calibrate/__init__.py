"""Calibration: turn float weights into PackedWeights (see core.py for the steps)."""

from .allocate import LayerPrices, allocate_bits, price_layers, quantize_per_layer
from .budget import allocate_ranks, quantize_with_ranks, rank_params
from .collect import collect
from .core import METHODS, activation_norms, calibrate
from .errors import BudgetError, CalibrationError
from .gptq import ROUNDINGS
from .report import layer_report
from .sensitivity import output_sensitivity
from .sequential import quantize_in_passes
from .stats import ActivationStats, merge_stats

__all__ = ["calibrate", "collect", "layer_report", "ActivationStats", "CalibrationError",
           "BudgetError", "activation_norms", "METHODS", "ROUNDINGS", "allocate_ranks", "quantize_with_ranks",
           "rank_params", "allocate_bits", "price_layers", "LayerPrices", "quantize_per_layer",
           "output_sensitivity", "merge_stats", "quantize_in_passes"]
