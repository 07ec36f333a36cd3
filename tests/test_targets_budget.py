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


def _scaled_layers():
    """Four layers whose weight error and output error disagree: the layers with the largest
    weights (so the largest weight error) see the smallest, correlated, inputs."""
    from synthetic import correlated_activations, heavy_tailed

    k = 256
    spec = {"a": (0.05, 0.1), "b": (0.03, 0.3), "c": (0.02, 1.0), "d": (0.01, 3.0)}  # (w scale, x scale)
    out = {}
    for i, (name, (ws, xs)) in enumerate(spec.items()):
        w = heavy_tailed(128, k, seed=30 + i, scale=ws, outlier_channels=2)
        out[name] = (w, xs * correlated_activations(1024, k, seed=i),
                     xs * correlated_activations(1024, k, seed=i, sample_seed=1))
    return out


def test_activation_aware_allocation_beats_data_free():
    from bitfuse.calibrate import ActivationStats
    from bitfuse import reference

    layers = _scaled_layers()
    weights = {n: v[0] for n, v in layers.items()}
    stats = {n: ActivationStats.from_tensor(v[1], 256) for n, v in layers.items()}
    cfg = QuantConfig(bits=3, group_size=64)

    def held_out_error(ranks):  # each layer calibrated with its rank and its activations
        tot = 0.0
        for n, (w, x, x_test) in layers.items():
            pw = calibrate(w, QuantConfig(bits=3, group_size=64, rank=ranks[n]), activations=x)
            tot += float((x_test @ (reference.dequantize(pw) - w).t()).square().sum())
        return tot

    free = allocate_ranks(weights, cfg, avg_rank=4)
    aware = allocate_ranks(weights, cfg, avg_rank=4, calib_data=stats)
    assert rank_params(aware, weights) <= 4 * sum(sum(w.shape) for w in weights.values())
    assert free["a"] > free["d"] and aware["d"] > aware["a"]   # weight error vs output error
    # measured: 9328 (data-free allocation) vs 5160 (activation-aware); 37827 with no ranks
    assert held_out_error(aware) < 0.7 * held_out_error(free)
    # raw activation tensors work like their statistics
    assert allocate_ranks(weights, cfg, avg_rank=4, calib_data={n: v[1] for n, v in layers.items()}) == aware
    with pytest.raises(ValueError, match="calib_data has nothing for 1 of the 4 layers"):
        allocate_ranks(weights, cfg, avg_rank=4, calib_data={n: stats[n] for n in "abc"})


def test_error_spectrum_whitened_matches_output_error():
    # σ² of the whitened error sum to the output error tr(E·H'·Eᵀ), when the probe keeps every
    # singular value; H' = H shrunk towards mean(diag H)·I by K/(M + K), plus the 1% ridge.
    from synthetic import correlated_activations
    from bitfuse.calibrate import ActivationStats
    from bitfuse.calibrate.lowrank import DAMP
    from bitfuse.calibrate.search import quantize

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    st = ActivationStats.from_tensor(correlated_activations(512, 64, seed=3), 64)
    cfg = QuantConfig(bits=3, group_size=64)
    s = error_spectrum(w, cfg, 32, activations=st)
    e = w - quantize(w, torch.ones_like(w, dtype=torch.bool), 3, 64, "rtn")[3]
    h = st.hessian().double()
    eye, mean_diag, shrink = torch.eye(64, dtype=torch.float64), float(h.diagonal().mean()), 64 / (512 + 64)
    h_damped = (1 - shrink) * h + (shrink + DAMP) * mean_diag * eye
    expected = float(((e.double() @ h_damped) * e.double()).sum())
    assert abs(float(s.double().square().sum()) - expected) <= 1e-4 * expected
