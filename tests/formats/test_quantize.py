"""The weight types' quantizers (weights.encode) give llama.cpp's bytes, and llama2.quantize its
per-tensor type rule.

The reference is llama.cpp's own quantizer: ../shared/assets/kquant/rand256-NAME.gguf were made by
it (llama-cpp-python 0.3.36) from rand256-f16.gguf. Without an importance matrix every type here
is a fixed rule in llama.cpp, so each tensor must match byte for byte.
"""

import re

import gguf as gguf_pkg
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from conftest import asset
from llama2 import native, quantize, weights
from llama2.quantize.mix import use_more_bits
from llama2.weights import ggml_quants

LLAMA_CPP_FILES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "q4_k_m", "q5_k_m")
QTYPES = tuple(n for n, t in native.WEIGHT_TYPES.items() if t.activations)  # q4_0 ... q8_0, q4_k ... q6_k


def encode(w, kind):  # -> (ggml type id, uint8 [rows, row_bytes])
    m = weights.encode(kind, w)
    return m.GGML_TYPE, m.data


def read(name):
    return gguf_pkg.GGUFReader(asset(f"kquant/rand256-{name}.gguf"))


def f16_source():
    return {t.name: np.array(t.data).astype(np.float32) for t in read("f16").tensors}


def layer_of(name):
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("name", LLAMA_CPP_FILES)
def test_bytes_equal_llama_cpp(name):
    """Every quantized tensor of llama.cpp's file equals ours from the same f16 weights."""
    src = f16_source()
    seen = set()
    for t in read(name).tensors:
        kind = t.tensor_type.name.lower()
        if kind == "f32":
            continue
        tid, ours = encode(src[t.name], kind)
        assert tid == int(t.tensor_type)
        theirs = np.array(t.data).view(np.uint8).reshape(ours.shape)
        block = weights.module(kind).DTYPE.itemsize
        same = (ours.reshape(-1, block) == theirs.reshape(-1, block)).all(axis=1)
        assert same.all(), f"{t.name} {kind}: {same.sum()} of {same.size} blocks equal"
        seen.add(kind)
    assert seen  # the file held quantized tensors


@pytest.mark.parametrize("name", LLAMA_CPP_FILES)
def test_tensor_types_follow_llama_cpp(name):
    reader = read(name)
    n_layers = int(reader.fields["llama.block_count"].contents())
    for t in reader.tensors:
        got = quantize.tensor_type(name, t.name, layer_of(t.name), n_layers, cols=int(t.shape[0]))
        assert got.upper() == t.tensor_type.name, t.name


def edge_blocks(cols=256, seed=0):
    """Rows of awkward blocks: zeros, constants, a single spike, ties of magnitude with opposite
    signs, exact halves, tiny and huge values, all-positive and all-negative rows, then noise."""
    rng = np.random.default_rng(seed)
    rows = [np.zeros(cols), np.full(cols, 0.75), np.full(cols, -3.0), np.eye(1, cols, 5)[0] * 7,
            np.tile([1.0, -1.0], cols // 2), np.tile([-1.0, 1.0], cols // 2),
            (np.arange(cols) % 64 - 32) + 0.5, np.arange(cols) * 1e-30, rng.standard_normal(cols) * 1e4,
            np.abs(rng.standard_normal(cols)), -np.abs(rng.standard_normal(cols)),
            np.where(np.arange(cols) % 32 < 16, 0.0, rng.standard_normal(cols))]
    rows += list(rng.standard_normal((20, cols)) * rng.uniform(1e-3, 10, (20, 1)))
    rows += list(rng.standard_t(2, (8, cols)))  # heavy tails: outliers in many blocks
    return np.array(rows, np.float32)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_legacy_equals_gguf_package(kind):
    """The gguf package implements the legacy types after llama.cpp's reference; equal bytes."""
    w = edge_blocks(cols=256)
    _, ours = encode(w, kind)
    theirs = gguf_quantize(w, T[kind.upper()])
    np.testing.assert_array_equal(ours, theirs)


# largest |x - dequantized| relative to the block's largest |x| (q*_0) or its range (q*_1), as the
# rules give: half a step, plus the float16 rounding of the scales; Q4_0/Q5_0 put the extreme on
# level -8 (-16), so the opposite extreme is clamped to +7 (+15): up to a whole step there
BOUNDS = {"q8_0": 0.5 / 127 + 2e-3, "q4_0": 1.0 / 8 + 2e-3, "q5_0": 1.0 / 16 + 2e-3,
          "q4_1": 1.0 / 15 + 2e-3, "q5_1": 1.0 / 31 + 2e-3}
# root-mean-square error relative to rms(x) on these Gaussian weights, measured: q4_0 0.0854,
# q4_1 0.0773, q5_0 0.0425, q5_1 0.0377, q8_0 0.00533, q4_k 0.0703, q5_k 0.0359, q6_k 0.0175;
# the bounds leave ~10%
RMS_BOUNDS = {"q4_0": 0.094, "q4_1": 0.085, "q5_0": 0.047, "q5_1": 0.042, "q8_0": 0.0059,
              "q4_k": 0.078, "q5_k": 0.040, "q6_k": 0.0193}


@pytest.mark.parametrize("kind", QTYPES)
def test_dequantized_close(kind):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    tid, raw = encode(w, kind)
    back = gguf_dequantize(raw, T(tid)).reshape(w.shape)
    rel = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
    assert rel < RMS_BOUNDS[kind], rel
    if kind in BOUNDS:
        blocks, err = w.reshape(-1, 32), (back - w).reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1)
        span = amax if kind.endswith("_0") else blocks.max(axis=1) - blocks.min(axis=1)
        assert (np.abs(err).max(axis=1) <= BOUNDS[kind] * span).all()


@pytest.mark.parametrize("kind", QTYPES)
def test_edge_blocks(kind):
    """Zero, constant, tiny and huge blocks: finite scales, zeros stay exactly zero, constants close."""
    w = edge_blocks()
    with np.errstate(all="raise", under="ignore"):  # every division is guarded, as in the reference
        tid, raw = encode(w, kind)
    back = gguf_dequantize(raw, T(tid)).reshape(w.shape)
    assert np.isfinite(back).all()
    assert not back[0].any()  # an all-zero row comes back exactly zero
    np.testing.assert_allclose(back[1], 0.75, rtol=1e-2)
    np.testing.assert_allclose(back[2], -3.0, rtol=1e-2)
    assert abs(back[3, 5] - 7) < 0.05 and np.abs(np.delete(back[3], 5)).max() < 0.5


@pytest.mark.parametrize("kind", QTYPES)
def test_chunking_does_not_change_bytes(kind, monkeypatch):
    w = edge_blocks(seed=1)
    whole = encode(w, kind)[1]
    monkeypatch.setattr(ggml_quants, "CHUNK_VALUES", 3 * 256)  # 24 blocks of 32, 3 super-blocks
    np.testing.assert_array_equal(encode(w, kind)[1], whole)


def test_quantize_shapes_and_errors():
    w = np.ones((3, 256), np.float32)
    for kind in QTYPES:
        tid, raw = encode(w, kind)
        assert raw.dtype == np.uint8 and raw.size == weights.stored_bytes(kind, 3, 256) and len(raw) == 3
        assert weights.module(tid).NAME == kind
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(np.ones((2, 96), np.float32), "q4_k")
    with pytest.raises(ValueError, match="unknown weight type"):
        encode(w, "q3_k")


def test_mix_rule_for_llama_2_7b():
    """Llama-2-7B (32 layers) in Q4_K_M: attn_v and ffn_down get Q6_K in layers 0-3, 28-31 and every
    third layer from 6 (llama.cpp's use_more_bits); the others and the rest stay Q4_K."""
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for mix, base in (("q4_k_m", "q4_k"), ("q5_k_m", "q5_k")):
        for i in range(32):
            want = "q6_k" if i in more else base
            assert quantize.tensor_type(mix, f"blk.{i}.attn_v.weight", i, 32) == want
            assert quantize.tensor_type(mix, "w2", i, 32) == want  # our names work too
            assert quantize.tensor_type(mix, f"blk.{i}.attn_q.weight", i, 32) == base
        assert quantize.tensor_type(mix, "output.weight", cols=4096) == "q6_k"
        assert quantize.tensor_type(mix, "token_embd.weight", cols=4096) == base
        assert quantize.tensor_type(mix, "token_embd.weight", cols=4096, has_output=False) == "q6_k"
        assert quantize.tensor_type(mix, "blk.0.attn_norm.weight", 0, 32) == "f32"
    assert quantize.tensor_type("q8_0", "output.weight", cols=4096) == "q8_0"
    assert quantize.tensor_type("q4_0", "output.weight", cols=4096) == "q6_k"
    # 70B (80 layers, grouped-query attention): attn_v at least Q5_K
    assert quantize.tensor_type("q4_k_m", "blk.11.attn_v.weight", 11, 80, n_heads=64, n_kv_heads=8) == "q5_k"
    assert quantize.tensor_type("q4_k_m", "blk.11.attn_v.weight", 11, 80, n_heads=64, n_kv_heads=64) == "q4_k"


def test_mix_fallbacks_for_short_rows():
    """Rows that do not fill 256-value super-blocks fall back as llama.cpp does."""
    t = quantize.tensor_type
    assert t("q4_k_m", "blk.0.attn_q.weight", 0, 5, cols=64) == "q5_0"
    assert t("q5_k_m", "blk.0.attn_q.weight", 0, 5, cols=64) == "q5_1"
    assert t("q6_k", "blk.0.attn_q.weight", 0, 5, cols=64) == "q8_0"
    assert t("q4_k_m", "blk.0.ffn_down.weight", 0, 5, cols=172) == "f16"
    assert t("q4_k_m", "output.weight", cols=64) == "q8_0"
    with pytest.raises(ValueError, match="unknown quantization"):
        t("q2_k", "output.weight")
