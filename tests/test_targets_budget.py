"""Target profiles' explicit defaults, and the global low-rank budget (calibrate.budget)."""

import pytest
import torch
import torch.nn as nn

from bitfuse import QuantConfig
from bitfuse.calibrate import BudgetError, allocate_ranks, calibrate, quantize_with_ranks, rank_params
from bitfuse.calibrate.budget import error_spectrum
from bitfuse.dispatch import BACKENDS
from bitfuse.targets import LAYOUTS_3BIT, PROFILES, profile_defaults, resolve_target


# ---- target profiles ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_defaults_are_explicit(name):
    d = profile_defaults(name)
    assert d["target"] == name
    assert d["group_size"] in (32, 64, 128)
    assert d["layout_3bit"] in LAYOUTS_3BIT and d["layout_3bit"] == "planes"
    assert d["kernel_preference"] and set(d["kernel_preference"]) <= set(BACKENDS)
    assert d["kernel_preference"][-1] == "torch"  # the reference path is always the last resort


def test_profile_defaults_values():
    assert profile_defaults("orin")["group_size"] == 64
    assert profile_defaults("h100")["group_size"] == 128
    assert profile_defaults("cpu")["kernel_preference"] == ["torch"]
    assert profile_defaults("auto")["target"] == resolve_target("auto") != "auto"
    with pytest.raises(ValueError):
        profile_defaults("tpu")


def test_target_does_not_change_quantconfig_defaults_and_is_recorded():
    assert QuantConfig(target="orin").group_size == QuantConfig().group_size == 128
    w = torch.randn(32, 128)
    for t in ("orin", "cpu", "auto"):
        pw = calibrate(w, QuantConfig(bits=4, group_size=64, target=t))
        assert pw.target == profile_defaults(t)["target"]
        assert pw.config["target"] == t


# ---- global rank budget -----------------------------------------------------------------------
def _layers():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(128, 256, generator=g) * 0.01
    big = torch.randn(128, 256, generator=g) * 0.5           # 50x the quantization error
    medium = torch.randn(128, 256, generator=g) * 0.1
    return {"small": small, "big": big, "medium": medium}


def test_budget_respected_and_high_error_layers_get_more():
    layers = _layers()
    cfg = QuantConfig(bits=3, group_size=64)
    widths = {n: sum(w.shape) for n, w in layers.items()}
    for avg in (2, 4, 8):
        ranks = allocate_ranks(layers, cfg, avg_rank=avg)
        assert set(ranks) == set(layers)
        spent = rank_params(ranks, layers)
        assert spent <= avg * sum(widths.values())
        assert ranks["big"] >= ranks["medium"] >= ranks["small"]
        assert ranks["big"] > ranks["small"]
    budget = 3000
    ranks = allocate_ranks(layers, cfg, total_rank_params=budget, multiple=2)
    assert rank_params(ranks, layers) <= budget
    assert all(r % 2 == 0 for r in ranks.values())


def test_budget_max_rank_and_zero():
    layers = _layers()
    cfg = QuantConfig(bits=3, group_size=64)
    ranks = allocate_ranks(layers, cfg, avg_rank=8, max_rank=5)
    assert max(ranks.values()) <= 5
    assert allocate_ranks(layers, cfg, avg_rank=0) == {n: 0 for n in layers}
    with pytest.raises(BudgetError, match="cheapest"):
        allocate_ranks(layers, cfg, total_rank_params=10)
    with pytest.raises(ValueError):
        allocate_ranks(layers, cfg)


def test_error_spectrum_deterministic_and_sorted():
    w = _layers()["big"]
    cfg = QuantConfig(bits=3, group_size=64)
    a = error_spectrum(w, cfg, 8)
    b = error_spectrum(w, cfg, 8)
    assert torch.equal(a, b)
    assert bool((a[:-1] >= a[1:]).all())


def test_quantize_with_ranks_applies_per_layer_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128), nn.Linear(128, 128))
    with torch.no_grad():
        model[0].weight.mul_(10)
    cfg = QuantConfig(bits=3, group_size=64)
    ranks = allocate_ranks(model, cfg, avg_rank=4)
    assert set(ranks) == {"0", "2", "3"}
    assert ranks["0"] >= ranks["3"]
    rows = []
    quantize_with_ranks(model, cfg, ranks, report=rows, progress=False)
    assert {r["name"]: r["rank"] for r in rows} == ranks
    assert all(r["target"] == resolve_target("auto") for r in rows)
    for name, r in ranks.items():
        assert model.get_submodule(name).packed.rank == r
    model(torch.randn(2, 128))
    with pytest.raises(ValueError, match="not quantizable"):
        quantize_with_ranks(nn.Sequential(nn.Linear(128, 64)), cfg, {"nope": 4}, progress=False)
