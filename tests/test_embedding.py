"""QuantEmbedding: nn.Embedding tables packed like linear weights (QuantConfig(embeddings=True))."""

import logging

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, reference
from bitfuse.nn import QuantEmbedding


def _model(rows=1001, dim=256, padding_idx=0, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Module()
    m.emb = torch.nn.Embedding(rows, dim, padding_idx=padding_idx)
    m.lin = torch.nn.Linear(dim, 64)
    return m


IDX = torch.tensor([[0, 5, 1000], [3, 3, 7]])


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128)])
def test_lookup_is_the_dequantized_table_and_close_to_float(bits, group):
    m = _model()
    w = m.emb.weight.detach().clone()
    bitfuse.quantize_(m, QuantConfig(bits=bits, group_size=group, embeddings=True))
    q = m.emb
    assert isinstance(q, QuantEmbedding) and isinstance(m.lin, bitfuse.QuantLinear)
    table = reference.dequantize(q.packed)  # the oracle: the packed table, dequantized
    out = q(IDX)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 256)
    assert torch.equal(out, table[IDX])
    # every entry is the grid point of its group nearest to the float value (clamped to the grid:
    # the range search may clip), w = code·scale + offset (FORMAT.md §5)
    g = q.packed.group_size
    s = q.packed.scales.float().repeat_interleave(g, dim=1)[:, :256]
    lo = q.packed.zeros.float().repeat_interleave(g, dim=1)[:, :256]
    clamped = torch.minimum(torch.maximum(w, lo), lo + (2 ** bits - 1) * s)
    err = (table - clamped).abs()
    assert bool((err <= 0.5 * s * (1 + 2 ** -10) + 1e-6).all()), float((err / s.clamp_min(1e-12)).max())
    assert float((table - w).pow(2).mean()) < float(w.pow(2).mean()) * {2: 0.15, 3: 0.04, 4: 0.01}[bits]
    assert torch.count_nonzero(out[0, 0]) == 0  # the all-zero padding row stays exactly zero


def test_output_dtype_follows_the_model_and_the_default_leaves_tables_alone():
    m = _model()
    bitfuse.quantize_(m, QuantConfig(bits=4, group_size=64))
    assert type(m.emb) is torch.nn.Embedding  # embeddings=False (default)
    bitfuse.quantize_(m, QuantConfig(bits=4, group_size=64, embeddings=True))
    m.half()
    assert m.emb(IDX).dtype == torch.float16 and m.emb.scales.dtype == torch.float16
    m.to(torch.bfloat16)
    assert m.emb(IDX).dtype == torch.bfloat16
    assert m.emb.qweight.dtype == torch.int32  # the packed buffers keep their dtypes


def test_save_load_round_trip_and_architecture_checks(tmp_path):
    m = _model()
    bitfuse.quantize_(m, QuantConfig(bits=3, group_size=64, embeddings=True, residual=True))
    path = str(tmp_path / "m.safetensors")
    bitfuse.save_quantized(m, path)
    meta = bitfuse.io.read_metadata(path)["layers"]["emb"]
    assert meta["module"] == "embedding" and meta["embedding"]["padding_idx"] == 0
    fresh = _model(seed=1).half()  # another seed: the table must come from the file
    bitfuse.load_quantized(fresh, path)
    assert isinstance(fresh.emb, QuantEmbedding) and fresh.emb.padding_idx == 0
    assert fresh.emb(IDX).dtype == torch.float16  # the dtype of the model loaded into
    assert torch.equal(fresh.emb(IDX).float(), m.emb(IDX).half().float())
    wrong = _model(rows=1000)
    with pytest.raises(bitfuse.CheckpointError, match="checkpoint embedding 'emb' is 1001 x 256, the model's is 1000 x 256"):
        bitfuse.load_quantized(wrong, path)
    assert type(wrong.emb) is torch.nn.Embedding  # left as it was
    other = _model()
    other.emb = torch.nn.Linear(256, 1001, bias=False)
    with pytest.raises(bitfuse.CheckpointError, match="is a embedding layer, the model has Linear"):
        bitfuse.load_quantized(other, path)


def test_bad_input_and_unsupported_tables(caplog):
    m = _model()
    bitfuse.quantize_(m, QuantConfig(bits=4, group_size=64, embeddings=True))
    with pytest.raises(TypeError, match="int64 or int32 indices, got torch.float32"):
        m.emb(IDX.float())
    assert torch.equal(m.emb(IDX.int()), m.emb(IDX))
    bad = torch.nn.Embedding(64, 64)
    with torch.no_grad():
        bad.weight[3, 4] = float("nan")
    with pytest.raises(bitfuse.CalibrationError, match="NaN/Inf"):
        QuantEmbedding.from_embedding(bad, QuantConfig(group_size=64))
    renorm = torch.nn.Embedding(100, 64, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm=1.0"):
        QuantEmbedding.from_embedding(renorm, QuantConfig(group_size=64))
    holder = torch.nn.Module()
    holder.emb = renorm
    with caplog.at_level(logging.INFO, logger="bitfuse"):
        bitfuse.quantize_(holder, QuantConfig(group_size=64, embeddings=True))
    assert type(holder.emb) is torch.nn.Embedding and "max_norm" in caplog.text
    tiny = torch.nn.Module()
    tiny.emb = torch.nn.Embedding(10, 64)  # fewer than 16 rows: too small to gain, as for a linear
    bitfuse.quantize_(tiny, QuantConfig(group_size=64, embeddings=True))
    assert type(tiny.emb) is torch.nn.Embedding


def test_gptq_rounding_is_nearest_for_tables_without_a_warning(caplog):
    """A lookup has no activations to feed GPTQ: tables are rounded to nearest, and that is not
    reported as a layer that lacked its statistics."""
    m = _model()
    with caplog.at_level(logging.WARNING, logger="bitfuse"):
        bitfuse.quantize_(m, QuantConfig(bits=4, group_size=64, embeddings=True),
                          calib_data={"lin": torch.randn(32, 256)}, calib_options={"rounding": "gptq"})
    assert isinstance(m.emb, QuantEmbedding) and "emb" not in caplog.text


def test_compiles_without_graph_breaks():
    m = _model()
    bitfuse.quantize_(m, QuantConfig(bits=4, group_size=64, embeddings=True))
    f = torch.compile(lambda i: m.lin(m.emb(i)), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(IDX), m.lin(m.emb(IDX)))


def test_dit_label_tables_quantized_and_the_pipeline_runs():
    """DiT's per-block class-label tables (4.3% of DiT-XL/2's weights) under embeddings=True."""
    pytest.importorskip("diffusers")
    from bitfuse.cli import fidelity
    from bitfuse.integrations.pipelines import quantize_pipeline, run_tiny_pipeline, tiny_dit_pipeline

    pipe = tiny_dit_pipeline()
    ref = run_tiny_pipeline(pipe)
    quantize_pipeline(pipe, QuantConfig(bits=4, group_size=32, embeddings=True))
    tables = [n for n, mod in pipe.transformer.named_modules() if isinstance(mod, QuantEmbedding)]
    assert tables == [f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table" for i in range(2)]
    # measured (seed 0): 23.0 dB, against 25.8 dB with the tables float; over seeds 0-2, 24.0
    # against 27.3: the label row feeds every block's adaLN modulation, so tables stay opt-in
    got = fidelity(ref, run_tiny_pipeline(pipe))["psnr_db"]
    assert got > 21, got


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_lookup_matches_the_reference(residual):
    """On a GPU the table is dequantized by the CUDA dequantize kernel: its rows must be the
    reference's bit for bit (fp32 out; the kernel's exact fp32 fma dequant)."""
    m = _model()
    bitfuse.quantize_(m, QuantConfig(bits=3, group_size=64, embeddings=True, residual=residual))
    want = m.emb(IDX)
    m.cuda()
    got = m.emb(IDX.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
