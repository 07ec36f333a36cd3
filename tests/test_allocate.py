"""Layer-wise bit allocation (allocate_bits, quantize_per_layer) and output sensitivity."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn as nn

from bitfuse import QuantConfig
from bitfuse.calibrate import (ActivationStats, BudgetError, allocate_bits, calibrate, collect, layer_report,
                               merge_stats, output_sensitivity, price_layers, quantize_per_layer)
from bitfuse.calibrate.allocate import solve_knapsack
from bitfuse.nn import QuantConv2d, QuantLinear
from bitfuse.synthetic import correlated_activations, heavy_tailed

CANDIDATES = [QuantConfig(bits=2, group_size=64), QuantConfig(bits=3), QuantConfig(bits=4)]


# ---- output sensitivity ------------------------------------------------------------------------

def test_sensitivity_of_a_linear_chain_is_the_diagonal_of_the_downstream_gram():
    """y = W2·W1·x: an error in W1's output channel n reaches y through column n of W2, so
    S1[n] = positions · Σ_m W2[m, n]², and S2 = positions (the identity follows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=False), nn.Linear(12, 8, bias=False))
    x = torch.randn(4, 32, 16)  # 128 positions per call
    s = output_sensitivity(model, [x, x], probes=32, seed=1)
    w2 = model[1].weight.detach()
    want1 = 128 * w2.square().sum(dim=0)
    assert torch.allclose(s["0"], want1, rtol=0.15)
    assert torch.allclose(s["1"], torch.full((8,), 128.0), rtol=0.15)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient computed


def test_sensitivity_conv_channels_and_unreached_layers():
    torch.manual_seed(0)
    class ConvOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.unused = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(4, 4)

        def forward(self, x):
            return self.conv(x)

    model = ConvOnly()
    s = output_sensitivity(model, [torch.randn(2, 3, 6, 6)], probes=64)
    assert s["conv"].shape == (5,)
    assert torch.allclose(s["conv"], torch.full((5,), 2 * 6 * 6.0), rtol=0.15)  # identity: positions
    assert torch.equal(s["unused"], torch.zeros(4))


def test_sensitivity_edge_cases_get_clear_answers(caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    with torch.inference_mode():
        x = torch.randn(3, 8)  # an inference tensor
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            output_sensitivity(model, [x])
    assert output_sensitivity(model, [x])["0"].shape == (8,)  # the batch is copied for autograd

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, v):
            return self.lin(v).detach()

    with pytest.raises(ValueError, match="does not depend on any probed layer"):
        output_sensitivity(Detached(), [x])
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)).eval()
    s = output_sensitivity(conv, [torch.randn(3, 6, 6)], probes=64)  # unbatched (C, H, W)
    assert torch.allclose(s["0"], torch.full((5,), 36.0), rtol=0.2)
    with caplog.at_level("WARNING", logger="bitfuse.calibrate"):
        output_sensitivity(model.train(), [x])
    assert "training mode" in caplog.text


def test_sensitivity_is_seeded_and_rejects_bad_arguments():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    a = output_sensitivity(model, [x], probes=2, seed=3)
    b = output_sensitivity(model, [x], probes=2, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="probes"):
        output_sensitivity(model, [x], probes=0)
    with pytest.raises(ValueError, match="no batches"):
        output_sensitivity(model, [])
    with pytest.raises(TypeError, match="nn.Module"):
        output_sensitivity(lambda v: v, [x])


# ---- the knapsack ------------------------------------------------------------------------------

def test_knapsack_is_exact_where_a_greedy_is_not():
    # layer A (10 weights) and B (100): the budget affords one upgrade. A greedy by score per
    # bit upgrades A (score 100 + 1); upgrading B instead leaves 1 + 10.
    bits = [[20.0, 30.0], [200.0, 300.0]]
    scores = [[2.0, 1.0], [100.0, 10.0]]
    assert solve_knapsack(bits, scores, 320.0) == [0, 1]
    assert solve_knapsack(bits, scores, 330.0) == [1, 1]
    assert solve_knapsack(bits, scores, 220.0) == [0, 0]
    with pytest.raises(BudgetError):
        solve_knapsack(bits, scores, 219.0)


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_layers, n_cand = 5, 3
    sizes = (torch.rand(n_layers, generator=g) * 1000 + 10).tolist()
    bits = [[sz * (2 + c + float(torch.rand(1, generator=g))) for c in range(n_cand)] for sz in sizes]
    scores = [sorted((torch.rand(n_cand, generator=g) * sz).tolist(), reverse=True) for sz in sizes]
    lo, hi = sum(min(b) for b in bits), sum(max(b) for b in bits)
    for budget in torch.linspace(lo, hi, 7, dtype=torch.float64).tolist():
        picks = solve_knapsack(bits, scores, budget)
        assert sum(b[i] for b, i in zip(bits, picks)) <= budget * (1 + 1e-12)
        best = min(sum(s[i] for s, i in zip(scores, combo))
                   for combo in itertools.product(range(n_cand), repeat=n_layers)
                   if sum(b[i] for b, i in zip(bits, combo)) <= budget * (1 + 1e-12))
        assert sum(s[i] for s, i in zip(scores, picks)) == pytest.approx(best)


def _layers(seed=0):
    shapes = [(64, 256), (128, 128), (32, 256), (96, 128)]
    out = {}
    for i, (n, k) in enumerate(shapes):
        w = heavy_tailed(n, k, seed=seed + i, outlier_channels=2)
        out[f"l{i}"] = (w, correlated_activations(2 * k, k, seed=i))
    return out


def _scores(layers, stats=None):
    """{(layer, candidate index): (bits, relative error)} by calibrating every pair."""
    table = {}
    for name, (w, x) in layers.items():
        for i, cfg in enumerate(CANDIDATES):
            pw = calibrate(w, cfg, activations=None if stats is None else x)
            rep = layer_report(w, pw, None if stats is None else x)
            err = rep["output_rel_err"] if stats is not None else rep["weight_rel_err"]
            table[name, i] = (pw.bpw * w.numel(), err)
    return table


@pytest.mark.parametrize("avg_bpw", [2.7, 3.3, 3.9])
def test_allocation_respects_the_budget_and_is_near_the_brute_force_optimum(avg_bpw):
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    report = []
    chosen = allocate_bits(weights, CANDIDATES, avg_bpw, report=report)
    table = _scores(layers)
    sizes = {n: w.numel() for n, w in weights.items()}
    total = sum(sizes.values())
    index = {n: CANDIDATES.index(c) for n, c in chosen.items()}
    bits = sum(table[n, i][0] for n, i in index.items())
    assert bits <= avg_bpw * total + 1e-6
    score = sum(table[n, i][1] for n, i in index.items())
    # the report says the same
    rows = [r for r in report if r["chosen"]]
    assert {r["name"]: r["candidate"] for r in rows} == index
    assert sum(r["bpw"] * r["weights"] for r in rows) == pytest.approx(bits)
    best = min(sum(table[n, i][1] for n, i in zip(weights, combo))
               for combo in itertools.product(range(len(CANDIDATES)), repeat=len(weights))
               if sum(table[n, i][0] for n, i in zip(weights, combo)) <= avg_bpw * total + 1e-6)
    assert score == pytest.approx(best)
    # more budget never scores worse
    richer = allocate_bits(weights, CANDIDATES, avg_bpw + 0.4)
    assert sum(table[n, CANDIDATES.index(c)][1] for n, c in richer.items()) <= score


def test_sensitivity_moves_bits_to_the_layer_that_matters():
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    stats = {n: x for n, (_, x) in layers.items()}
    flat = {n: torch.ones(w.shape[0]) for n, w in weights.items()}
    base = allocate_bits(weights, CANDIDATES, 2.8, calib_data=stats, sensitivity=flat)
    loud = dict(flat, l2=torch.full((weights["l2"].shape[0],), 1e6))
    moved = allocate_bits(weights, CANDIDATES, 2.8, calib_data=stats, sensitivity=loud)
    assert base["l2"].bits < 4 and moved["l2"].bits == 4


def test_allocation_errors_name_the_problem():
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    stats = {n: x for n, (_, x) in layers.items()}
    with pytest.raises(BudgetError, match=r"reachable minimum") as e:
        allocate_bits(weights, CANDIDATES, 2.0)
    assert "2.5" in str(e.value)  # every layer's cheapest, W2 g64, costs 2.5 bpw
    with pytest.raises(ValueError, match="needs the layers' activations"):
        allocate_bits(weights, CANDIDATES, 3.0, sensitivity={n: torch.ones(w.shape[0]) for n, w in weights.items()})
    with pytest.raises(ValueError, match="calib_data has nothing for"):
        allocate_bits(weights, CANDIDATES, 3.0, calib_data={"l0": stats["l0"]})
    with pytest.raises(ValueError, match=r"sensitivity\['l0'\] must be a \(64,\) tensor"):
        allocate_bits(weights, CANDIDATES, 3.0, calib_data=stats,
                      sensitivity={n: torch.ones(8) for n in weights})
    with pytest.raises(ValueError, match="negative or non-finite"):
        allocate_bits(weights, CANDIDATES, 3.0, calib_data=stats,
                      sensitivity={n: torch.full((w.shape[0],), float("nan")) for n, w in weights.items()})
    with pytest.raises(ValueError, match="agree on QuantConfig.target"):
        allocate_bits(weights, [QuantConfig(bits=2, target="orin"), QuantConfig(bits=4)], 3.0)
    with pytest.raises(TypeError, match="non-empty"):
        allocate_bits(weights, [], 3.0)
    with pytest.raises(ValueError, match="avg_bpw"):
        allocate_bits(weights, CANDIDATES, -1)


# ---- applying it ------------------------------------------------------------------------------

def test_quantize_per_layer_applies_each_layers_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128), nn.Conv2d(8, 32, 3))
    configs = {"0": QuantConfig(bits=2, group_size=64), "3": QuantConfig(bits=4, group_size=64)}
    rows = []
    quantize_per_layer(model, configs, QuantConfig(bits=3, group_size=64), report=rows, progress=False)
    assert isinstance(model[0], QuantLinear) and model[0].packed.class_bits == [2]
    assert isinstance(model[2], QuantLinear) and model[2].packed.class_bits == [3]  # the default
    # the conv is named, so it is quantized although its config has convs=False
    assert isinstance(model[3], QuantConv2d) and model[3].packed.class_bits == [4]
    assert sorted(r["name"] for r in rows) == ["0", "2", "3"]
    plain = nn.Sequential(nn.Linear(128, 64), nn.Conv2d(8, 32, 3))
    quantize_per_layer(plain, {}, QuantConfig(bits=3, group_size=64), progress=False)
    assert isinstance(plain[0], QuantLinear) and type(plain[1]) is nn.Conv2d  # default without convs
    with pytest.raises(ValueError, match="not nn.Linear/nn.Conv2d layers"):
        quantize_per_layer(plain, {"nope": QuantConfig()})
    with pytest.raises(TypeError, match="must be a bitfuse.QuantConfig"):
        quantize_per_layer(plain, {"0": {"bits": 3}})


class _DampedBlockMLP(nn.Module):
    """An MLP whose middle block feeds a residual stream through a small gain, as a late
    residual branch does: its errors reach the output 100x damped (in squared terms), which
    only the output sensitivity can tell."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 64)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.inp(x))
        h = h + 0.1 * self.mid(h)
        return self.out(h)


def _model_error(model, ref, x):
    with torch.no_grad():
        return float((model(x) - ref).square().sum() / ref.square().sum())


def test_sensitivity_weighted_allocation_beats_uniform_at_equal_bits_on_the_model_output():
    """The end-to-end claim at small scale: at the bpw of uniform W3 g128, the allocation with
    output sensitivity has a lower model-output error than uniform W3 g128 (both GPTQ)."""
    model = _DampedBlockMLP()
    x_cal = correlated_activations(512, 128, seed=0)
    x_held = correlated_activations(256, 128, seed=0, sample_seed=1)
    with torch.no_grad():
        ref = model(x_held)
    stats = collect(model, [x_cal])
    sens = output_sensitivity(model, [x_cal], probes=8)
    opts = {"rounding": "gptq"}
    import copy

    from bitfuse import quantize_

    uniform = copy.deepcopy(model)
    quantize_(uniform, QuantConfig(bits=3), calib_data=stats, calib_options=opts, progress=False)
    packed = [m.packed for m in uniform.modules() if isinstance(m, QuantLinear)]
    bpw = sum(p.bpw * p.out_features * p.in_features for p in packed) / sum(
        p.out_features * p.in_features for p in packed)
    configs = allocate_bits(model, CANDIDATES, bpw, calib_data=stats, sensitivity=sens, calib_options=opts)
    allocated = copy.deepcopy(model)
    quantize_per_layer(allocated, configs, calib_data=stats, calib_options=opts, progress=False)
    assert configs["mid"].bits < min(configs["inp"].bits, configs["out"].bits)
    assert _model_error(allocated, ref, x_held) < 0.7 * _model_error(uniform, ref, x_held)


# ---- diffusion models ---------------------------------------------------------------------------

def test_diffusers_sensitivity_bare_denoiser_and_pipeline():
    pytest.importorskip("diffusers")
    from bitfuse.integrations import diffusers as bd
    from bitfuse.integrations.pipelines import tiny_dit_pipeline

    unet = bd.tiny_unet()
    s = bd.sensitivity(unet, [bd.unet_inputs(unet, batch=1)], steps=2, probes=2)
    linears = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= set(s)
    assert all(bool(torch.isfinite(v).all()) and bool((v >= 0).all()) for v in s.values())
    assert sum(float(s[n].sum()) > 0 for n in linears) > len(linears) // 2
    assert all(p.grad is None for p in unet.parameters())

    pipe = tiny_dit_pipeline()
    calls = [dict(class_labels=[1], output_type="latent", generator=torch.Generator().manual_seed(0))]
    out = bd.sensitivity(pipe, calls, steps=2, probes=1)
    assert set(out) == {"transformer"}
    per_layer = out["transformer"]
    assert {n for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)} <= set(per_layer)
    assert sum(float(v.sum()) > 0 for v in per_layer.values()) > 0
    with pytest.raises(ValueError, match="number of inference steps"):
        bd.sensitivity(pipe, calls, steps=[1, 2])


def test_price_layers_once_then_allocate_many_budgets():
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    prices = price_layers(weights, CANDIDATES, keep_packed=True)
    assert prices.objective == "weight_rel"
    assert prices.min_bpw() == pytest.approx(2.5)
    for budget in (2.7, 3.3):
        chosen = prices.allocate(budget)
        assert chosen == allocate_bits(weights, CANDIDATES, budget)
        assert prices.bpw(chosen) <= budget
        for n, cfg in chosen.items():  # the kept PackedWeight is the chosen candidate's
            assert prices.packed[n][CANDIDATES.index(cfg)].class_bits == [cfg.bits]
    assert prices.score(prices.allocate(3.3)) < prices.score(prices.allocate(2.7))
    assert len(prices.rows()) == len(weights) * len(CANDIDATES)
    assert price_layers(nn.Sequential(nn.ReLU()), CANDIDATES).allocate(3.0) == {}


def test_prices_hold_every_objective_their_inputs_allow():
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    stats = {n: x for n, (_, x) in layers.items()}
    sens = {n: torch.ones(w.shape[0]) for n, w in weights.items()}
    prices = price_layers(weights, CANDIDATES, calib_data=stats, sensitivity=sens)
    assert prices.objective == "sensitivity"
    assert set(prices.by_objective) == {"sensitivity", "output_rel", "weight_rel"}
    for n, (w, x) in layers.items():  # output_rel is layer_report's relative output error
        rep = layer_report(w, calibrate(w, CANDIDATES[1], activations=x), x)
        assert prices.by_objective["output_rel"][n][1] == pytest.approx(rep["output_rel_err"], rel=1e-5)
        assert prices.by_objective["weight_rel"][n][1] == pytest.approx(rep["weight_rel_err"], rel=1e-5)
    assert prices.allocate(3.0, objective="output_rel") == allocate_bits(weights, CANDIDATES, 3.0, calib_data=stats)
    with pytest.raises(ValueError, match="objective 'sensitivity' is not available"):
        price_layers(weights, CANDIDATES).allocate(3.0, objective="sensitivity")


def test_holdout_scores_expose_a_layer_fitted_to_few_directions():
    """GPTQ fits a layer whose calibration inputs span 4 directions (a time embedding sees one
    row per timestep) closely, so scored on its own data its error looks small. Scored on
    held-out inputs, its error shows (35-100x here) and it gets more bits."""
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    fit = {n: x for n, (_, x) in layers.items()}
    few = fit["l1"][:4].repeat(64, 1)  # 256 rows, 4 distinct
    fit = dict(fit, l1=few)
    held = {n: correlated_activations(x.shape[0], x.shape[1], seed=i, sample_seed=3)
            for i, (n, x) in enumerate(fit.items())}  # l1's real input distribution
    opts = {"rounding": "gptq"}
    blind = price_layers(weights, CANDIDATES, calib_data=fit, calib_options=opts)
    seen = price_layers(weights, CANDIDATES, calib_data=fit, holdout=held, calib_options=opts)
    assert all(h > 20 * b for h, b in zip(seen.scores["l1"], blind.scores["l1"]))
    assert all(h < 2 * b for n in ("l0", "l2", "l3") for h, b in zip(seen.scores[n], blind.scores[n]))
    assert seen.allocate(3.3)["l1"].bits > blind.allocate(3.3)["l1"].bits
    with pytest.raises(ValueError, match="holdout statistics score candidates fitted on calib_data"):
        allocate_bits(weights, CANDIDATES, 3.0, holdout=held)
    with pytest.raises(ValueError, match="holdout has nothing for"):
        allocate_bits(weights, CANDIDATES, 3.0, calib_data=fit, holdout={"l0": held["l0"]})


def test_merge_stats_is_the_statistics_of_all_inputs_and_leaves_its_inputs_alone():
    a, b = torch.randn(50, 16), torch.randn(30, 16)
    sa, sb = {"x": ActivationStats.from_tensor(a, 16), "y": ActivationStats.from_tensor(a[:, :8], 8)}, \
        {"x": ActivationStats.from_tensor(b, 16)}
    merged = merge_stats(sa, sb)
    both = ActivationStats.from_tensor(torch.cat([a, b]), 16)
    assert set(merged) == {"x"}  # "y" is missing from the second part
    assert merged["x"].count == 80 and sa["x"].count == 50 and sb["x"].count == 30
    # fp32 products per batch, fp64 sums: equal to fp32 rounding of sums of 80 terms
    assert torch.allclose(merged["x"].xtx, both.xtx, rtol=1e-5, atol=1e-5 * float(both.xtx.abs().max()))
    assert torch.allclose(merged["x"].sq_sum, both.sq_sum, rtol=1e-5)
    assert merge_stats() == {}


def test_quantize_per_layer_rounds_groups_without_statistics_to_nearest(caplog):
    """A default config for convs (statistics collected for the linears only) under rounding="gptq": the
    convs are rounded to nearest with a warning, as quantize_ does, not refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Conv2d(16, 32, 3))
    stats = collect(model[:1], [torch.randn(64, 128)])
    with caplog.at_level("WARNING", logger="bitfuse.calibrate"):
        quantize_per_layer(model, {"0": QuantConfig(bits=3)}, QuantConfig(bits=4, group_size=64, convs=True),
                           calib_data=stats, calib_options={"rounding": "gptq"}, progress=False)
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantConv2d)
    assert "rounded to nearest" in caplog.text and "'1'" in caplog.text


def test_allocation_over_linears_and_convs_with_patch_statistics(caplog):
    """Candidates with convs=True allocate convs too, priced with their patch statistics
    (collect(convs=True)) under GPTQ; a layer whose statistics kept only the diagonal
    (max_full_bytes) is priced with nearest rounding, with a warning, not refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 64))
    batches = [torch.randn(4, 16, 4, 4) for _ in range(4)]
    fit, held = collect(model, batches[::2], convs=True), collect(model, batches[1::2], convs=True)
    sens = output_sensitivity(model, batches[:2], probes=2)
    cands = [dataclasses.replace(c, convs=True) for c in CANDIDATES]
    prices = price_layers(model, cands, calib_data=fit, holdout=held, sensitivity=sens,
                          calib_options={"rounding": "gptq"}, progress=False)
    assert set(prices.bits) == {"0", "1", "3"}
    chosen = prices.allocate(3.0)
    assert prices.bpw(chosen) <= 3.0
    # the widest layer (the linear, K=512) keeps only the diagonal under this budget
    narrow = collect(model, batches[::2], convs=True, max_full_bytes=8 * (144 ** 2 + 288 ** 2))
    assert narrow["3"].xtx is None and narrow["1"].xtx is not None
    with caplog.at_level("WARNING", logger="bitfuse.calibrate"):
        diag = price_layers(model, cands, calib_data=narrow, calib_options={"rounding": "gptq"}, progress=False)
    assert "priced with nearest rounding, e.g. ['3']" in caplog.text
    near = price_layers({"3": model[3]}, cands, calib_data={"3": narrow["3"]}, progress=False)
    assert diag.bits["3"] == near.bits["3"] and diag.scores["3"] == near.scores["3"]


def test_small_error_paths_name_the_problem():
    layers = _layers()
    weights = {n: w for n, (w, _) in layers.items()}
    stats = {n: x for n, (_, x) in layers.items()}
    bad = dict(stats, l2=torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"calib_data\['l2'\]: activations must have last dim in_features=256"):
        price_layers(weights, CANDIDATES, calib_data=bad)
    with pytest.raises(ValueError, match=r"calib_options has unknown keys \['roundng'\]"):
        price_layers(weights, CANDIDATES, calib_options={"roundng": "gptq"})
    for bpw in (True, float("nan"), 0):
        with pytest.raises(ValueError, match="avg_bpw must be a positive number"):
            allocate_bits(weights, CANDIDATES, bpw)
    prices = price_layers(weights, CANDIDATES)
    with pytest.raises(ValueError, match=r"configs\['l0'\] = .* is not one of these prices' candidates"):
        prices.bpw({"l0": QuantConfig(bits=4, group_size=32)})
    # merge_stats takes raw activations too
    merged = merge_stats({"a": stats["l0"]}, {"a": ActivationStats.from_tensor(stats["l0"], 256)})
    assert merged["a"].count == 2 * stats["l0"].shape[0]


# ---- calibration in passes (memory-bounded) ----------------------------------------------------

def test_plan_passes_cuts_in_order_within_the_bound():
    from bitfuse.calibrate.sequential import plan_passes

    w = {"a": 16, "b": 16, "c": 32, "d": 8, "e": 16}
    assert plan_passes(w, 8 * 32 ** 2) == [["a", "b"], ["c"], ["d", "e"]]
    # c (8·32² bytes) is over this bound: it keeps the diagonal and rides in the open pass
    assert plan_passes(w, 8 * (2 * 16 ** 2)) == [["a", "b", "c"], ["d", "e"]]
    assert plan_passes(w, 10 ** 9) == [list(w)]
    # over the bound a layer keeps only the diagonal and takes no pass of its own
    assert plan_passes(w, 0) == [list(w)]
    with pytest.raises(ValueError, match="max_full_bytes must be >= 0"):
        plan_passes(w, -1)


def test_quantize_in_passes_is_sequential_gptq_within_the_memory_bound(caplog):
    """Each pass collects the XᵀX of the layers it quantizes, with the earlier passes' layers
    already quantized; one pass is quantize_ on collect's statistics; a layer alone over the
    bound keeps the diagonal and is rounded to nearest, with a warning."""
    from bitfuse.api import quantize_
    from bitfuse.calibrate import quantize_in_passes

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Flatten(),
                             nn.Linear(16 * 4 * 4, 64), nn.GELU(), nn.Linear(64, 64))
    batches = [torch.randn(4, 8, 4, 4) for _ in range(3)]
    cfg = QuantConfig(bits=3, group_size=64, convs=True)
    opts = {"rounding": "gptq"}
    # one layer per pass (the widest, K=256, needs 8·256² bytes)
    seq = quantize_in_passes(model(), cfg, batches, max_full_bytes=8 * 256 ** 2, calib_options=opts, progress=False)
    manual = model()
    for name in ("0", "3", "5"):
        stats = collect(manual, batches, convs=True, filter_fn=lambda m, n, name=name: n == name)
        quantize_(manual, cfg, filter_fn=lambda m, n, name=name: n == name, calib_data=stats,
                  calib_options=opts, progress=False)
    for name in ("0", "3", "5"):
        assert torch.equal(seq.get_submodule(name).packed.qweight, manual.get_submodule(name).packed.qweight)
    # the last layer saw the quantized layers' outputs, unlike one pass over the float model
    one = quantize_in_passes(model(), cfg, batches, max_full_bytes=10 ** 9, calib_options=opts, progress=False)
    ref = model()
    quantize_(ref, cfg, calib_data=collect(ref, batches, convs=True), calib_options=opts, progress=False)
    assert torch.equal(one[5].packed.qweight, ref[5].packed.qweight)
    assert not torch.equal(one[5].packed.qweight, seq[5].packed.qweight)
    # under a bound no layer fits, every layer keeps the diagonal: nearest rounding, announced
    with caplog.at_level("WARNING", logger="bitfuse"):
        tight = quantize_in_passes(model(), cfg, batches, max_full_bytes=0, calib_options=opts, progress=False)
    assert "rounded to nearest" in caplog.text
    near = model()
    quantize_(near, cfg, calib_data=collect(near, batches, convs=True, full=False), progress=False)
    assert torch.equal(tight[0].packed.qweight, near[0].packed.qweight)  # the first pass saw the float model
    with pytest.raises(TypeError, match="give a list"):
        quantize_in_passes(model(), cfg, iter(batches), max_full_bytes=0)
    with pytest.raises(TypeError, match="config must be a bitfuse.QuantConfig, got dict"):
        quantize_in_passes(model(), {"bits": 4}, batches, max_full_bytes=0)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        quantize_in_passes("unet", cfg, batches, max_full_bytes=0)
    with pytest.raises(ValueError, match="max_full_bytes must be >= 0"):
        quantize_in_passes(model(), cfg, batches, max_full_bytes=-1)


def test_quantize_in_passes_follows_the_order_layers_run_in():
    """Registration order is not run order (a diffusers UNet registers up blocks before its mid
    block): passes follow the order the layers first run in."""
    from bitfuse.api import quantize_
    from bitfuse.calibrate import quantize_in_passes
    from bitfuse.calibrate.sequential import run_order

    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.late, self.early = nn.Linear(64, 64), nn.Linear(64, 64)   # registered late first

        def forward(self, x):
            return self.late(torch.nn.functional.gelu(self.early(x)))

    batches = [torch.randn(16, 64) for _ in range(2)]
    assert run_order(Reversed(), {"late": 64, "early": 64}, batches, collect) == ["early", "late"]
    cfg, opts = QuantConfig(bits=3, group_size=64), {"rounding": "gptq"}
    seq = quantize_in_passes(Reversed(), cfg, batches, max_full_bytes=8 * 64 ** 2, calib_options=opts, progress=False)
    manual = Reversed()
    for name in ("early", "late"):
        keep = lambda m, n, name=name: n == name  # noqa: E731
        quantize_(manual, cfg, filter_fn=keep, calib_data=collect(manual, batches, filter_fn=keep),
                  calib_options=opts, progress=False)
    assert torch.equal(seq.late.packed.qweight, manual.late.packed.qweight)
