"""Weight types (llama2.weights): every type's numpy dequantization against the `gguf` package's
reference, bit for bit on random blocks; every Matrix's product and row lookups against its
dequantized matrix, on whichever path it takes (native kernels, or tiles through BLAS)."""

import mmap

import numpy as np
import pytest

from llama2 import weights as W
from llama2.errors import Llama2Error
from llama2.weights import base

GGML = [m for m in W.MODULES if m.GGML_TYPE is not None]
# Activation blocks of the integer kernels (native.matmul's contract): Q8_0 for the 32-value types,
# Q8_K for the k-quants; the float types keep float activations.
ACTIVATION_BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32,
                    "q4_k": 256, "q5_k": 256, "q6_k": 256}


def random_blocks(module, count, rng, scale=1.0):
    """`count` blocks of random bytes (any bytes are a block) with finite float16 fields."""
    raw = rng.integers(0, 256, count * module.DTYPE.itemsize, dtype=np.uint8)
    blocks = raw.view(module.DTYPE)
    if module.DTYPE.names is None:  # the float types: values themselves
        values = (scale * rng.standard_normal(count)).astype(np.float32)
        blocks[:] = values if module.NAME == "f32" else \
            values.astype(np.float16) if module.NAME == "f16" else (values.view(np.uint32) >> 16)
        return blocks
    for field in module.DTYPE.names:
        if module.DTYPE[field] == np.dtype("<f2"):
            blocks[field] = (scale * rng.standard_normal(count)).astype(np.float16)
    return blocks


@pytest.mark.parametrize("module", GGML, ids=lambda m: m.NAME)
def test_dequantize_equals_gguf_reference_bit_for_bit(module):
    gguf = pytest.importorskip("gguf", reason="the reference dequantization is the gguf package's")
    rng = np.random.default_rng(module.GGML_TYPE)
    raw = rng.integers(0, 256, 300 * module.DTYPE.itemsize, dtype=np.uint8)  # any bits, NaNs too
    blocks = raw.view(module.DTYPE).copy()
    if module.DTYPE.names is not None:  # block scales finite (the values are whatever the bits say)
        blocks = random_blocks(module, 300, rng, scale=10.0)
    rows = blocks.reshape(10, 30)
    ours = module.dequantize(rows).reshape(10, -1)
    ref = gguf.quants.dequantize(rows.view(np.uint8).reshape(10, -1),
                                 gguf.GGMLQuantizationType(module.GGML_TYPE))
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (10, 30 * module.BLOCK)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert module.DTYPE.itemsize == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(module.GGML_TYPE)][1]


def test_int8_groups_dequantize_is_value_times_its_groups_scale():
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, (7, 30), dtype=np.int8)  # 210 values: rows straddle groups of 8
    s = rng.standard_normal(-(-210 // 8)).astype(np.float32)
    m = W.int8_groups.Matrix(q, s, 8)
    expect = np.array([[np.float32(q[r, c]) * s[(r * 30 + c) // 8] for c in range(30)] for r in range(7)])
    np.testing.assert_array_equal(m.dequantize(), expect)
    np.testing.assert_array_equal(m.rows([6, 0, 3]), expect[[6, 0, 3]])


def registry_cases():
    return [pytest.param(m, id=m.NAME) for m in GGML]


def product_bound(module, x, wd):
    """|x @ wd.T - product| allowed: float dots within float32 rounding; the integer kernels also
    round each activation to its block's int8 grid (half a step, amax/254) and keep the Q8_0 step in
    float16 (2^-11 relative)."""
    x, wd = x.astype(np.float64), wd.astype(np.float64)
    absprod = np.abs(x) @ np.abs(wd).T
    block = ACTIVATION_BLOCK.get(module.NAME)
    if block is None:
        return 1e-5 * absprod + 1e-6
    amax = np.abs(x).reshape(len(x), -1, block).max(axis=-1)  # [N, blocks]
    step = np.repeat(amax / 254.0, block, axis=1)  # [N, in]: half a quantization step per value
    return step @ np.abs(wd).T + 2.0 ** -10 * absprod + 1e-6


@pytest.mark.parametrize("module", registry_cases())
@pytest.mark.parametrize("rows", [1, 5, 40])  # decode, a short prompt, a prompt past tile_rows
def test_matrix_product_and_rows_equal_the_dequantized_matrix(module, rows, monkeypatch):
    rng = np.random.default_rng(100 + module.GGML_TYPE)
    out_dim, in_dim = 36, 512  # 36 rows: blocks of four plus none left; 512: two k-quant blocks
    blocks = random_blocks(module, out_dim * in_dim // module.BLOCK, rng, scale=0.05)
    m = module.Matrix(blocks.reshape(out_dim, -1))
    assert m.shape == (out_dim, in_dim) and m.nbytes == blocks.nbytes
    wd = m.dequantize()
    np.testing.assert_array_equal(wd, module.dequantize(blocks).reshape(out_dim, in_dim))
    x = rng.standard_normal((rows, in_dim)).astype(np.float32)
    monkeypatch.setattr(base, "DEQUANT_TILE", 5 * in_dim)  # several tiles on the BLAS path
    got = m(x)
    assert got.shape == (rows, out_dim) and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - x.astype(np.float64) @ wd.astype(np.float64).T)
    bound = product_bound(module, x, wd)
    assert np.all(err <= bound), f"{module.NAME}: max error {err.max()} over bound {bound[err > bound]}"
    ids = np.array([35, 0, 7, 7, 20])
    np.testing.assert_array_equal(m.rows(ids), wd[ids])


def test_matrix_is_a_view_of_the_buffer():
    buf = mmap.mmap(-1, 4096)
    m = W.from_buffer(12, buf, 144, (2, 512))  # Q4_K at byte 144: two rows of two blocks
    assert m.NAME == "q4_k" and m.nbytes == 4 * 144
    start = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
    assert m.data.__array_interface__["data"][0] == start + 144
    buf[144:146] = np.float16(2.0).tobytes()  # the block's d, changed in the file, shows
    assert m.blocks[0, 0]["d"] == 2.0


def test_from_buffer_rejects_rows_of_partial_blocks_and_short_files():
    from llama2.errors import FormatError
    with pytest.raises(FormatError, match="not whole blocks of 256"):
        W.from_buffer("q6_k", bytes(10_000), 0, (2, 300), "m.gguf: tensor x")
    with pytest.raises(FormatError, match="runs past the end"):
        W.from_buffer("q8_0", bytes(100), 0, (2, 64), "m.gguf: tensor x")


def test_registry_names_every_type_once():
    assert sorted(W.BY_NAME) == sorted(["f32", "f16", "bf16", "q8_0", "int8_groups", "q4_0", "q4_1", "q5_0",
                                        "q5_1", "q4_k", "q5_k", "q6_k"])
    assert {t: W.module(t).NAME for t in (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30)} == {
        0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 12: "q4_k",
        13: "q5_k", 14: "q6_k", 30: "bf16"}
    assert W.module("fp16") is W.f16


def test_quantize_at_load_hook():
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    m = W.quantize("q8_0", w, group_size=32)
    assert m.NAME == "int8_groups" and m.group_size == 32
    assert np.abs(m.dequantize() - w).max() <= np.abs(w).max() / 254 * 1.0001
    with pytest.raises(Llama2Error, match="--quantize 'q3_xx': expected one of q8_0"):
        W.quantizer("q3_xx")


def native_cases():
    return [pytest.param(m, id=m.NAME) for m in GGML]


@pytest.mark.parametrize("module", native_cases())
def test_a_rows_product_does_not_depend_on_its_batch(module):
    """The server's batches: up to invariant_rows rows, each row's product is bit for bit its
    product alone (the integer and float types: at every N); past it (BLAS on dequantized tiles) the
    activations are rounded as the native kernel rounds them, so the two paths agree to float32
    summation order."""
    rng = np.random.default_rng(200 + module.GGML_TYPE)
    m = module.Matrix(random_blocks(module, 24 * 512 // module.BLOCK, rng, scale=0.05).reshape(24, -1))
    if module.Matrix.ACTIVATIONS is not None:  # integer kernels: every N stays native
        assert m.invariant_rows == m.tile_rows == base.ALL_ROWS
    elif module.NAME in ("f32", "f16", "bf16"):  # the native float gemm: every N
        assert m.invariant_rows >= base.ALL_ROWS
    else:
        assert m.invariant_rows == m.tile_rows - 1
    n = min(m.invariant_rows, 70)  # past two tiles of the widest kernel (8 rows), odd
    x = rng.standard_normal((n + 3, 512)).astype(np.float32)
    few = m(x[:n])
    for i in (0, 1, 7, 8, 9, n - 1):
        np.testing.assert_array_equal(m(x[i:i + 1])[0], few[i])
    np.testing.assert_array_equal(m(x[5:n])[n - 6], few[n - 1])  # another batch, another tile position
    if m.invariant_rows < len(x):
        many = m(x)  # the tile path
        absprod = np.abs(x[:n]).astype(np.float64) @ np.abs(m.dequantize()).T.astype(np.float64)
        assert np.all(np.abs(many[:n] - few) <= 1e-5 * absprod + 1e-6)
