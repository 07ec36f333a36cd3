"""quantize_ on tiny diffusers models, save/load round trips, and bad checkpoints."""

import logging
import os

import pytest
import torch

import bitfuse
from bitfuse import QuantConfig, QuantLinear
from _checkpoint import edit_meta, header, rewrite_header

diffusers_mod = pytest.importorskip("diffusers")
from bitfuse.integrations.diffusers import dit_inputs, tiny_dit, tiny_unet, unet_inputs  # noqa: E402

RECIPE = QuantConfig(bits=3, group_size=32, residual=0.5, mixed_bits=(2, 3, 4), rank=4, outliers=0.005)


def _unet_out(m):
    with torch.no_grad():
        return m(*unet_inputs(m)).sample


def _dit_out(m):
    x, t, c = dit_inputs(m)
    with torch.no_grad():
        return m(x, timestep=t, class_labels=c).sample


@pytest.fixture(scope="module")
def quantized_unet(tmp_path_factory):
    unet = tiny_unet()
    ref = _unet_out(unet)
    bitfuse.quantize_(unet, RECIPE)
    path = str(tmp_path_factory.mktemp("ckpt") / "unet.safetensors")
    bitfuse.save_quantized(unet, path)
    return unet, ref, path


def test_quantize_unet_runs_and_stays_close(quantized_unet):
    unet, ref, _ = quantized_unet
    n_q = sum(isinstance(m, QuantLinear) for m in unet.modules())
    assert n_q >= 40
    out = _unet_out(unet)
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.1, rel


def test_save_load_into_fresh_float_unet_is_bit_identical(quantized_unet):
    unet, _, path = quantized_unet
    fresh = tiny_unet(seed=123)  # other random weights: everything must come from the file
    loaded = bitfuse.load_quantized(fresh, path)
    assert loaded is fresh
    assert torch.equal(_unet_out(loaded), _unet_out(unet))
    for name, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            assert m.bpw == unet.get_submodule(name).bpw


def test_quantize_dit_save_load(tmp_path):
    dit = tiny_dit()
    ref = _dit_out(dit)
    bitfuse.quantize_(dit, QuantConfig(bits=4, group_size=64))
    out = _dit_out(dit)
    assert float((out - ref).norm() / ref.norm()) < 0.1
    path = str(tmp_path / "dit.safetensors")
    bitfuse.save_quantized(dit, path)
    loaded = bitfuse.load_quantized(tiny_dit(seed=5), path)
    assert torch.equal(_dit_out(loaded), out)


def test_small_layers_are_skipped_with_a_log_line(caplog):
    dit = tiny_dit()
    with caplog.at_level(logging.INFO, logger="bitfuse"):
        bitfuse.quantize_(dit, QuantConfig(bits=4, group_size=128, fit_group=False))
    assert "skipping" in caplog.text and "too small to gain" in caplog.text
    assert isinstance(dit.transformer_blocks[0].ff.net[2], QuantLinear)       # 256 inputs
    assert isinstance(dit.transformer_blocks[0].attn1.to_q, torch.nn.Linear)  # 64 < 128 inputs
    # With the group fitted to K (the default), the 64-input layers are one g64 group wide.
    dit = tiny_dit()
    bitfuse.quantize_(dit, QuantConfig(bits=4, group_size=128))
    q = dit.transformer_blocks[0].attn1.to_q
    assert isinstance(q, QuantLinear) and q.group_size == 64 and q.config["group_size"] == 128
    # Narrower than the smallest group is still too small.
    model = torch.nn.Sequential(torch.nn.Linear(24, 64))
    with caplog.at_level(logging.INFO, logger="bitfuse"):
        bitfuse.quantize_(model, QuantConfig(bits=4, group_size=32))
    assert isinstance(model[0], torch.nn.Linear) and "in_features=24 < group_size=32" in caplog.text


def test_filter_fn_and_calib_data():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    bitfuse.quantize_(model, QuantConfig(bits=4, group_size=32, outliers=0.01),
                      filter_fn=lambda m, fqn: fqn == "2", calib_data={"2": torch.randn(8, 64)})
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], QuantLinear)
    with pytest.raises(ValueError, match="not quantizable layers of this model"):
        bitfuse.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), QuantConfig(group_size=32),
                          calib_data={"nope": torch.randn(2, 64)})


# ---- bad checkpoints ---------------------------------------------------------------------------

def _small_model(seed=0, out=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, out))


@pytest.fixture()
def small_ckpt(tmp_path):
    m = bitfuse.quantize_(_small_model(), QuantConfig(bits=4, group_size=32, residual=True, rank=2))
    path = str(tmp_path / "m.safetensors")
    bitfuse.save_quantized(m, path)
    return m, path


def test_small_round_trip(small_ckpt):
    m, path = small_ckpt
    x = torch.randn(3, 64)
    assert torch.equal(bitfuse.load_quantized(_small_model(seed=9), path)(x), m(x))


def test_truncated_checkpoint(small_ckpt):
    _, path = small_ckpt
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    fresh = _small_model()
    before = [p.clone() for p in fresh.parameters()]
    with pytest.raises(bitfuse.CheckpointError, match="truncated|corrupted"):
        bitfuse.load_quantized(fresh, path)
    # nothing in the model was changed by the failed load
    assert all(isinstance(fresh[i], torch.nn.Linear) for i in (0, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))


def test_corrupted_bytes_fail_crc(small_ckpt):
    _, path = small_ckpt
    n, _ = header(path)
    with open(path, "r+b") as f:
        f.seek(8 + n + 10)
        b = f.read(1)
        f.seek(8 + n + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(bitfuse.CheckpointError, match="CRC"):
        bitfuse.load_quantized(_small_model(), path)


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00" * 5)
    with pytest.raises(bitfuse.CheckpointError, match="truncated or not a safetensors"):
        bitfuse.load_quantized(_small_model(), str(p))
    with pytest.raises(bitfuse.CheckpointError, match="does not exist"):
        bitfuse.load_quantized(_small_model(), str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("version,hint", [(99, "reads version 2"), (1, "re-quantize")])
def test_wrong_version(small_ckpt, version, hint):
    _, path = small_ckpt
    edit_meta(path, lambda meta: meta.__setitem__("format_version", version))
    with pytest.raises(bitfuse.CheckpointError, match=f"format_version {version}") as e:
        bitfuse.load_quantized(_small_model(), path)
    assert hint in str(e.value)


def test_not_a_bitfuse_checkpoint(small_ckpt):
    _, path = small_ckpt
    _, h = header(path)
    del h["__metadata__"]
    rewrite_header(path, h)
    with pytest.raises(bitfuse.CheckpointError, match="not a bitfuse checkpoint"):
        bitfuse.load_quantized(_small_model(), path)


def test_architecture_mismatch(small_ckpt):
    _, path = small_ckpt
    with pytest.raises(bitfuse.CheckpointError, match="architecture mismatch"):
        bitfuse.load_quantized(_small_model(out=16), path)
    other = torch.nn.Sequential(torch.nn.Linear(64, 48))
    with pytest.raises(bitfuse.CheckpointError, match="does not exist in this model"):
        bitfuse.load_quantized(other, path)
    conv = torch.nn.Sequential(torch.nn.Conv2d(64, 48, 1), torch.nn.GELU(), torch.nn.Linear(48, 32))
    with pytest.raises(bitfuse.CheckpointError, match="the model has Conv2d"):
        bitfuse.load_quantized(conv, path)


def test_inconsistent_packed_values_are_caught(small_ckpt, tmp_path):
    m, _ = small_ckpt
    m[0].res_index[0] = 7  # a residual row used twice
    path = str(tmp_path / "bad.safetensors")
    bitfuse.save_quantized(m, path)
    with pytest.raises(bitfuse.CheckpointError, match="res_index"):
        bitfuse.load_quantized(_small_model(), path)


def test_save_without_quantized_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear"):
        bitfuse.save_quantized(_small_model(), str(tmp_path / "x.safetensors"))
    assert not list(tmp_path.iterdir())
