"""The compiled kernels (llama2.native) at every instruction-set variant this CPU runs.

Weights are random blocks (any bytes are a valid block once the fp16 scales are finite); the
references are gguf.quants.dequantize and plain numpy versions of the activation rule."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

from llama2 import native, weights
from llama2.threads import threads

VARIANTS = native.variants()  # scalar, avx2, avx512, avx512vnni: whichever this CPU runs

# Block layouts (weights/<type>.py's DTYPE, whose sizes test_weight_types holds to gguf's), to set
# the scale fields of random blocks: every ggml type the extension lists.
GGML = [m for m in weights.MODULES if m.GGML_TYPE is not None]
BLOCKS = {GT(m.GGML_TYPE): m.DTYPE for m in GGML if m.Matrix.ACTIVATIONS}
FLOATS = tuple(GT(m.GGML_TYPE) for m in GGML if not m.Matrix.ACTIVATIONS)  # F32, F16, BF16
QUANTS = tuple(BLOCKS)
ALL = FLOATS + QUANTS
K_QUANTS = tuple(t for t in QUANTS if native.TYPES[int(t)][1] == 256)  # Q4_K, Q5_K, Q6_K
# Activation row counts: decode (1..8), the 4- and 8-row tiles and their tails, prompts.
PROMPT_NS = (1, 3, 6, 8, 9, 31, 33, 64, 130)


pytestmark = pytest.mark.usefixtures("restore_level")  # conftest.py


def finite_f16_bits(rng, shape):
    """Any finite half, subnormals and zeros included."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype(np.uint16)


def random_weights(rng, t, rows, cols, extreme=False):
    """uint8 [rows, row_bytes] of type t. extreme: scales (and float values) from any finite bits;
    otherwise scales of a real model's size."""
    if t == GT.F32:
        w = (rng.standard_normal((rows, cols)) * (1e3 if extreme else 1)).astype(np.float32)
        return w.view(np.uint8)
    if t == GT.F16:
        h = finite_f16_bits(rng, (rows, cols)) if extreme else rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint16)
        return h.view(np.uint8)
    if t == GT.BF16:
        if extreme:
            b = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
            b = np.where((b & 0x7F80) == 0x7F80, b & 0x807F, b).astype(np.uint16)
        else:
            b = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return b.view(np.uint8)
    dt = np.dtype(BLOCKS[t])
    name, values, nbytes = native.TYPES[int(t)]
    assert dt.itemsize == nbytes
    nb = cols // values
    raw = rng.integers(0, 256, size=(rows, nb * nbytes), dtype=np.uint8)
    blocks = raw.view(dt).reshape(rows, nb)
    for f in ("d", "m", "dmin"):
        if f in dt.names:
            if extreme:
                blocks[f] = finite_f16_bits(rng, (rows, nb)).view(np.float16)
            else:
                blocks[f] = (rng.standard_normal((rows, nb)) * (0.002 if t in K_QUANTS else 0.02)).astype(np.float16)
    return raw


def gguf_dequant(t, w):
    return dequantize(w.view(np.uint8), t).reshape(w.shape[0], -1).astype(np.float32)


def ref_q8(x, block):
    """The activation rule in numpy: q = rint(x * id) clamped to +-127, d = max|x| / 127."""
    xb = x.reshape(x.shape[0], -1, block)
    d = (np.abs(xb).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int8)
    return d, q


def ref_quantize_q8_0(x):
    d, q = ref_q8(x, 32)
    n, nb = d.shape
    out = np.empty((n, nb, 34), np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(n, -1)


def ref_quantize_q8_k(x):
    d, q = ref_q8(x, 256)
    n, nb = d.shape
    out = np.empty((n, nb, 292), np.uint8)
    out[..., :4] = d.view(np.uint8).reshape(n, nb, 4)
    out[..., 4:260] = q.view(np.uint8)
    bsums = q.reshape(n, nb, 16, 16).astype(np.int16).sum(axis=-1, dtype=np.int16)
    out[..., 260:] = bsums.view(np.uint8).reshape(n, nb, 32)
    return out.reshape(n, -1)


def dequantized_activations(t, x):
    """What the integer kernels multiply: x after the activation rule, as float64."""
    if t in FLOATS:
        return x.astype(np.float64)
    block = 256 if t in K_QUANTS else 32
    d, q = ref_q8(x, block)
    if block == 32:
        d = d.astype(np.float16).astype(np.float32)  # Q8_0 blocks keep d as fp16
    return (q.astype(np.float64) * d[..., None].astype(np.float64)).reshape(x.shape)


def activations(rng, n, cols):
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x[:, :32] *= 20  # outliers in one block, as real activations have
    if n > 1:
        x[1, :] = 0  # an all-zero row: d = 0
    return x


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_rows_is_bit_equal_to_gguf(t, variant):
    native.select_variant(variant)
    rng = np.random.default_rng(int(t) * 7 + len(variant))
    cols = 512
    w = random_weights(rng, t, 19, cols, extreme=True)
    ref = gguf_dequant(t, w)
    ids = np.array([0, 18, 5, 5, 11, 1, 17, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16], np.int64)
    out = np.empty((len(ids), cols), np.float32)
    native.dequantize_rows(int(t), w, ids, out)
    np.testing.assert_array_equal(out.view(np.uint32), ref[ids].view(np.uint32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_matmul_equals_dequantized_product(t, variant):
    native.select_variant(variant)
    rng = np.random.default_rng(int(t) * 13 + len(variant))
    rows = 37  # not a multiple of the row chunk
    cols = 200 if t in FLOATS else 512  # float types: a tail after the vector loop
    w = random_weights(rng, t, rows, cols)
    wd = gguf_dequant(t, w).astype(np.float64)
    for n in PROMPT_NS:
        x = activations(rng, n, cols)
        out = np.full((n, rows), np.nan, np.float32)
        native.matmul(int(t), w, x, out)
        scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        # 1. The exact product of what the kernel multiplies: float rounding only (<= 2e-6 relative
        #    to sum |w x|; integer dots are exact, blocks combine in f32; seen: <= 2.2e-7).
        exact = dequantized_activations(t, x) @ wd.T
        np.testing.assert_array_less(np.abs(out - exact), 2e-6 * scale + 1e-30)
        # 2. The product with the f32 activations: the activation rule's rounding, at most
        #    0.57 * d per value (d = block max / 127; Q8_0 stores d as fp16), besides the above.
        if t in FLOATS:
            bound = 2e-6 * scale + 1e-30
        else:
            block = 256 if t in K_QUANTS else 32
            d = np.abs(x.reshape(n, -1, block)).max(axis=-1) / 127
            err = np.repeat(d, block, axis=1) * 0.57
            bound = err @ np.abs(wd).T + 2e-6 * scale + 1e-30
        np.testing.assert_array_less(np.abs(out - x.astype(np.float64) @ wd.T), bound)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_matmul_float_views_and_rows_of_a_tile(t):
    """Each output row is the same whatever N is (one kernel call's own sum), and F32/F16/BF16
    weights may come as their float32/float16/uint16 views."""
    rng = np.random.default_rng(int(t))
    cols = 256
    w = random_weights(rng, t, 9, cols)
    x = activations(rng, 6, cols)
    full = np.empty((6, 9), np.float32)
    native.matmul(int(t), w, x, full)
    for i in range(6):
        one = np.empty((1, 9), np.float32)
        native.matmul(int(t), w, x[i:i + 1], one)
        np.testing.assert_array_equal(one[0], full[i])
    view = {GT.F32: np.float32, GT.F16: np.float16, GT.BF16: np.uint16}.get(t)
    if view is not None:
        again = np.empty_like(full)
        native.matmul(int(t), w.view(view), x, again)
        np.testing.assert_array_equal(again, full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_quantization_matches_numpy_rule(variant):
    native.select_variant(variant)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((5, 512)) * rng.choice([1e-3, 1, 50], size=(5, 1))).astype(np.float32)
    x[2] = 0
    # Ties: a block whose max is 127 has d = 1 exactly, so x.5 values must round half to even.
    x[3, :32] = np.arange(-16, 16) + np.float32(0.5)
    x[3, 0] = 127
    x[3, 256:] = x[3, :256]
    np.testing.assert_array_equal(native.quantize_q8_0(x), ref_quantize_q8_0(x))
    np.testing.assert_array_equal(native.quantize_q8_k(x), ref_quantize_q8_k(x))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_threads_one_and_two_agree(t):
    rng = np.random.default_rng(11)
    rows, cols = 301, 512
    w = random_weights(rng, t, rows, cols)
    x = activations(rng, 33, cols)
    outs = []
    try:
        for n in (1, 2, 1, 2):
            native.set_threads(n)
            out = np.empty((33, rows), np.float32)
            native.matmul(int(t), w, x, out)
            outs.append(out)
    finally:
        native.set_threads(threads())
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def batch_rows_alone(product, x, rows):
    """Asserts that every row of product(x) [N, rows] is bit for bit the product of that row alone
    and of the row inside another batch (shifted by 5: another tile position)."""
    n = len(x)
    full = product(x)
    for i in range(n):
        np.testing.assert_array_equal(product(x[i:i + 1])[0].view(np.uint32), full[i].view(np.uint32),
                                      err_msg=f"row {i} of {n}")
    np.testing.assert_array_equal(product(x[5:]).view(np.uint32), full[5:].view(np.uint32))
    return full


@pytest.mark.parametrize("nthreads", (1, 2))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", QUANTS, ids=lambda t: t.name)
def test_a_rows_product_is_the_same_alone_or_in_any_batch(t, variant, nthreads):
    """The contract behind Matrix.invariant_rows = ALL_ROWS: whatever N, the tile a row lands in,
    the thread count or the chunking, each output is computed by the same operations."""
    native.select_variant(variant)
    rng = np.random.default_rng(int(t) * 3 + len(variant))
    rows, cols = 37, 512  # odd: the AVX-512 kernels' row pairs plus a row alone
    w = random_weights(rng, t, rows, cols)
    x = activations(rng, 41, cols)
    try:
        native.set_threads(nthreads)

        def product(a):
            out = np.empty((len(a), rows), np.float32)
            native.matmul(int(t), w, a, out)
            return out
        batch_rows_alone(product, x, rows)
        # odd row ranges: a product of rows 1..rows-1 (pairs shifted by one) gives the same bits
        w1 = np.ascontiguousarray(w[1:])
        out = np.empty((len(x), rows - 1), np.float32)
        native.matmul(int(t), w1, x, out)
        np.testing.assert_array_equal(out.view(np.uint32), product(x)[:, 1:].view(np.uint32))
    finally:
        native.set_threads(threads())


# Batch sizes around every tile edge: decode (4, or 8 on AVX-512), the gemm tile (8 on AVX2 and
# AVX-512; the k-quants: 64, in groups of 8 or 4), each with its tails.
BATCH_NS = (3, 4, 5, 8, 9, 31, 33, 64, 130)


@pytest.mark.parametrize("rows", (37, 3, 1))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", QUANTS, ids=lambda t: t.name)
def test_gemm_rows_equal_rows_alone_at_every_batch_size(t, variant, rows):
    """Every gemm path (the AVX-512 row pairs, AVX2's eight activation rows per weight row, the
    odd row left over) gives each output the bits the row gets alone, for batch sizes on and off
    every tile edge and odd weight-row counts, at one and two threads."""
    native.select_variant(variant)
    rng = np.random.default_rng(int(t) * 5 + rows + len(variant))
    cols = 512
    w = random_weights(rng, t, rows, cols)
    x = activations(rng, max(BATCH_NS) + 3, cols)

    def product(a):
        out = np.empty((len(a), rows), np.float32)
        native.matmul(int(t), w, a, out)
        return out.view(np.uint32)
    alone = np.stack([product(x[i:i + 1])[0] for i in range(len(x))])
    try:
        for nthreads in (1, 2):
            native.set_threads(nthreads)
            for n in BATCH_NS:
                np.testing.assert_array_equal(product(x[:n]), alone[:n], err_msg=f"N={n}, {nthreads} threads")
                np.testing.assert_array_equal(product(x[3:3 + n]), alone[3:3 + n], err_msg=f"N={n} at 3")
    finally:
        native.set_threads(threads())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", (GT.Q8_0, GT.Q4_K, GT.Q6_K), ids=lambda t: t.name)
def test_prompt_products_over_several_activation_blocks(t, variant):
    """A prompt whose activations (as the kernel takes them) pass ops.c's block of 4 MB: 2000 rows
    of 2048 values, two blocks, the second partial. Every output has the bits its row gets in a
    pass of 100 rows (one block), at one and two threads."""
    native.select_variant(variant)
    rng = np.random.default_rng(int(t) + len(variant))
    rows, cols, n = 20, 2048, 2000
    w = random_weights(rng, t, rows, cols)
    x = activations(rng, n, cols)
    small = np.empty((n, rows), np.float32)
    try:
        for nthreads in (1, 2):
            native.set_threads(nthreads)
            for i in range(0, n, 100):
                native.matmul(int(t), w, x[i:i + 100], small[i:i + 100])
            out = np.empty((n, rows), np.float32)
            native.matmul(int(t), w, x, out)
            np.testing.assert_array_equal(out.view(np.uint32), small.view(np.uint32), err_msg=f"{nthreads} threads")
    finally:
        native.set_threads(threads())


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_rows_gemm_rows_equal_rows_alone_at_every_batch_size(variant):
    native.select_variant(variant)
    rng = np.random.default_rng(7 + len(variant))
    rows, cols, gs = 37, 512, 64
    q = rng.integers(-128, 128, size=(rows, cols), dtype=np.int8)
    s = (rng.random(rows * cols // gs) * 0.01).astype(np.float32)
    x = activations(rng, max(BATCH_NS), cols)

    def product(a):
        out = np.empty((len(a), rows), np.float32)
        native.matmul_int8_rows(q, s, gs, a, out)
        return out.view(np.uint32)
    alone = np.stack([product(x[i:i + 1])[0] for i in range(len(x))])
    for n in BATCH_NS:
        np.testing.assert_array_equal(product(x[:n]), alone[:n], err_msg=f"N={n}")


@pytest.mark.parametrize("t", QUANTS, ids=lambda t: t.name)
def test_simd_variants_give_the_same_bits(t):
    """avx2, avx512 and avx512vnni compute each output by the same integer and float operations
    (the AVX-512 kernels put two weight rows in one register, each half doing the 256-bit
    arithmetic), so they agree bit for bit; the scalar variant sums in another order (but for the
    BLOCK_ORDER types below). With each
    variant's rows alike in decode and prompts (the batch tests above), this is what lets a
    quantized type's decode run on another SIMD variant than its prompts (native.select_kernels)."""
    simd = [v for v in VARIANTS if v != "scalar"]
    if len(simd) < 2:
        pytest.skip(f"this CPU runs one SIMD variant ({simd})")
    rng = np.random.default_rng(int(t) + 50)
    rows, cols = 37, 512
    w = random_weights(rng, t, rows, cols)
    x = activations(rng, 19, cols)
    outs = {}
    for v in simd:
        native.select_variant(v)
        outs[v] = np.empty((len(x), rows), np.float32)
        native.matmul(int(t), w, x, outs[v])
    for v in simd[1:]:
        np.testing.assert_array_equal(outs[v].view(np.uint32), outs[simd[0]].view(np.uint32), err_msg=v)


# Types whose kernels sum exact integers per block, then fma per block in a fixed order
# (native/kq_gemm.h, native/q0_common.h): the same bits at every variant, scalar included.
BLOCK_ORDER = [(t, 768) for t in K_QUANTS] + [(t, cols) for t in (GT.Q8_0, GT.Q4_0) for cols in (768, 736, 96)]


@pytest.mark.parametrize("t, cols", BLOCK_ORDER, ids=lambda v: getattr(v, "name", str(v)))
def test_block_order_types_give_the_same_bits_at_every_variant(t, cols):
    """Exact integer sums per block, then fma per block (k-quants: in block order; Q8_0, Q4_0: into
    eight accumulators by block mod 8, summed as a tree), so the scalar variant (fmaf) matches the
    SIMD ones too, at decode and prompt sizes; 40 weight rows: two whole AVX-512 panels (16) and
    rows left over for the decode body. Q8_0 and Q4_0 also at 23 and 3 blocks a row (a last group
    of fewer than eight blocks)."""
    rng = np.random.default_rng(int(t) + 90)
    rows = 40
    w = random_weights(rng, t, rows, cols)
    x = activations(rng, 70, cols)
    outs = {}
    for v in VARIANTS:
        native.select_variant(v)
        outs[v] = np.empty((len(x), rows), np.float32)
        native.matmul(int(t), w, x, outs[v])
        one = np.empty((1, rows), np.float32)
        native.matmul(int(t), w, x[7:8], one)
        np.testing.assert_array_equal(one.view(np.uint32), outs[v][7:8].view(np.uint32), err_msg=v)
    for v in VARIANTS[1:]:
        np.testing.assert_array_equal(outs[v].view(np.uint32), outs[VARIANTS[0]].view(np.uint32), err_msg=v)


@pytest.mark.parametrize("variant", VARIANTS)
def test_matmul_int8_rows_rows_alone_or_in_any_batch(variant):
    native.select_variant(variant)
    rng = np.random.default_rng(len(variant))
    rows, cols, gs = 37, 512, 64
    q = rng.integers(-128, 128, size=(rows, cols), dtype=np.int8)
    s = (rng.random(rows * cols // gs) * 0.01).astype(np.float32)

    def product(a):
        out = np.empty((len(a), rows), np.float32)
        native.matmul_int8_rows(q, s, gs, a, out)
        return out
    batch_rows_alone(product, activations(rng, 41, cols), rows)


def test_empty_products():
    w = np.zeros((4, 144), np.uint8)
    out = np.empty((0, 4), np.float32)
    native.matmul(int(GT.Q4_K), w, np.zeros((0, 256), np.float32), out)
    out = np.full((2, 0), 1, np.float32)
    native.matmul(int(GT.Q4_K), np.zeros((0, 144), np.uint8), np.ones((2, 256), np.float32), out)
    out = np.full((2, 4), np.nan, np.float32)
    native.matmul(int(GT.F32), np.zeros((4, 0), np.float32), np.ones((2, 0), np.float32), out)
    np.testing.assert_array_equal(out, 0)


def test_shape_errors_are_one_line():
    w = np.zeros((4, 144), np.uint8)
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match=r"matmul: w rows hold 144 bytes; 256 columns of Q6_K need 210"):
        native.matmul(int(GT.Q6_K), w, x, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"matmul: out must be float32 \[2, 4\]"):
        native.matmul(int(GT.Q4_K), w, x, np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="not a multiple of Q4_K's block of 256"):
        native.matmul(int(GT.Q4_K), w, np.zeros((2, 100), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="ggml type 9 is not a weight type"):
        native.matmul(9, w, x, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="x must be a float32 array"):
        native.matmul(int(GT.Q4_K), w, x.astype(np.float64), np.empty((2, 4), np.float32))
    with pytest.raises(IndexError, match="row 4 is outside the matrix's 4 rows"):
        native.dequantize_rows(int(GT.Q4_K), w, np.array([4]), np.empty((1, 256), np.float32))


def run_python(code, **env):
    import os
    import subprocess
    import sys

    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("level", native.supported())
def test_llama2_isa_forces_a_level(level):
    r = run_python("from llama2 import native; print(native.level(), native.variant())", LLAMA2_ISA=level)
    assert r.returncode == 0, r.stderr
    got_level, got_variant = r.stdout.split()
    assert got_level == level
    assert got_variant in native._LEVEL_VARIANTS[level]


def test_llama2_isa_unknown_or_missing_level_is_one_line():
    r = run_python("from llama2 import native", LLAMA2_ISA="neon")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].endswith("LLAMA2_ISA=neon: expected one of scalar, avx2, avx512")
    # A CPU without AVX-512 (this one may have it: the check is the same function).
    from llama2.errors import UsageError
    with pytest.raises(UsageError, match=r"^LLAMA2_ISA=avx512: this CPU cannot run the avx512 kernels "
                                         r"\(it runs: scalar, avx2\)$"):
        native.resolve("avx512", ("scalar", "avx2"))
    assert native.resolve("avx2", ("scalar", "avx2")) == "avx2"
    with pytest.raises(UsageError, match=r"^native.select\('avx9'\): expected one of scalar, avx2, avx512$"):
        native.select("avx9")


def test_select_switches_level_in_process():
    for level in native.supported():
        assert native.select(level) == level
        assert native.level() == level


def test_threads_setting_sizes_the_native_pool():
    from llama2 import threads
    before = threads.threads()
    try:
        assert threads.set_threads(3) == 3
        assert native._native.threads() == 3
    finally:
        threads.set_threads(before)
    assert native._native.threads() == before


def test_wide_rows_and_many_activation_rows():
    """Rows wider than the prompt chunk's cache budget (256 KB / row -> 4-row chunks), N > 4."""
    rng = np.random.default_rng(3)
    rows, cols = 9, 70000
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((6, cols)).astype(np.float32)
    out = np.empty((6, rows), np.float32)
    native.matmul(int(GT.F32), w, x, out)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.T.astype(np.float64))
    np.testing.assert_array_less(np.abs(out - ref), 2e-6 * scale)


def test_concurrent_callers_and_fork():
    """Two Python threads share the pool (one runs alone when it is busy); a forked child
    starts its own workers."""
    code = """
import os, threading, numpy as np
from llama2 import native, weights
native.set_threads(2)
rng = np.random.default_rng(0)
w = rng.integers(0, 256, (300, 4 * 144), dtype=np.uint8)
w.reshape(300, 4, 144)[..., :4] = [0, 0x14, 0, 0x14]
x = rng.standard_normal((5, 1024)).astype(np.float32)
want = np.empty((5, 300), np.float32)
native.matmul(12, w, x, want)
bad = []
def work():
    out = np.empty_like(want)
    for _ in range(200):
        native.matmul(12, w, x, out)
        if not np.array_equal(out, want):
            bad.append(1)
ts = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in ts]
[t.join() for t in ts]
pid = os.fork()
if pid == 0:
    out = np.empty_like(want)
    native.matmul(12, w, x, out)
    os._exit(0 if np.array_equal(out, want) else 3)
_, status = os.waitpid(pid, 0)
print(len(bad), os.waitstatus_to_exitcode(status))
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("gs", (32, 64, 256))
def test_matmul_int8_rows_equals_dequantized_product(gs, variant):
    """llama2.c version-2 Q8 read in place: int8 q [rows, cols] and a float scale per group."""
    native.select_variant(variant)
    rng = np.random.default_rng(gs + len(variant))
    rows, cols = 37, 512
    q = rng.integers(-128, 128, size=(rows, cols), dtype=np.int8)
    s = (rng.random(rows * cols // gs) * 0.01).astype(np.float32)
    wd = (q.astype(np.float32).reshape(-1, gs) * s[:, None]).reshape(rows, cols).astype(np.float64)
    for n in PROMPT_NS:
        x = activations(rng, n, cols)
        out = np.full((n, rows), np.nan, np.float32)
        native.matmul_int8_rows(q, s, gs, x, out)
        scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        exact = dequantized_activations(GT.Q8_0, x) @ wd.T
        np.testing.assert_array_less(np.abs(out - exact), 2e-6 * scale + 1e-30)
        d = np.abs(x.reshape(n, -1, 32)).max(axis=-1) / 127
        bound = np.repeat(d, 32, axis=1) * 0.57 @ np.abs(wd).T + 2e-6 * scale + 1e-30
        np.testing.assert_array_less(np.abs(out - x.astype(np.float64) @ wd.T), bound)
    # The same products as GGUF Q8_0 when the groups are its blocks and the scales are fp16 values:
    # equal per block, summed in another float order (native/q0_common.h), so equal to rounding.
    if gs == 32:
        s16 = s.astype(np.float16)
        blocks = np.empty((rows, cols // 32, 34), np.uint8)
        blocks[..., :2] = s16.view(np.uint8).reshape(rows, -1, 2)
        blocks[..., 2:] = q.view(np.uint8).reshape(rows, -1, 32)
        a, b = np.empty((5, rows), np.float32), np.empty((5, rows), np.float32)
        x = activations(rng, 5, cols)
        native.matmul(int(GT.Q8_0), blocks.reshape(rows, -1), x, a)
        native.matmul_int8_rows(q, s16.astype(np.float32), 32, x, b)
        w16 = q * np.repeat(s16.astype(np.float64).reshape(rows, -1), 32, axis=1)
        scale = np.abs(dequantized_activations(GT.Q8_0, x)) @ np.abs(w16).T
        np.testing.assert_array_less(np.abs(a.astype(np.float64) - b), 2e-6 * scale + 1e-30)


def test_matmul_int8_rows_errors():
    q = np.zeros((4, 96), np.int8)
    x = np.zeros((1, 96), np.float32)
    with pytest.raises(ValueError, match="group size 48 must be a multiple of 32 that divides the 96 columns"):
        native.matmul_int8_rows(q, np.zeros(8, np.float32), 48, x, np.empty((1, 4), np.float32))
    with pytest.raises(ValueError, match="s must be float32 with at least 12 scales"):
        native.matmul_int8_rows(q, np.zeros(11, np.float32), 32, x, np.empty((1, 4), np.float32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", FLOATS, ids=lambda t: t.name)
def test_float_prompt_products_are_the_dot_kernels_bits(t, variant):
    """Float weights with more rows than a dot call takes (prompts) run on gemm.c: rows widened per
    panel, a register-blocked kernel over all N. Every output is within float rounding of the
    float64 product of the widened matrix, and has exactly the bits it gets alone (one row, the dot
    kernel) at the same level, for any N and both thread counts: batch invariance."""
    native.select_variant(variant)
    rng = np.random.default_rng(int(t) * 17 + len(variant))
    try:
        # odd shapes: rows not a multiple of any kernel block or panel, cols with a tail after the
        # vector loop (or shorter than one vector step); 1100 rows x 300 cols: several panels;
        # 2100 cols: the row in three steps of the kernel (1024 values each, then the rest); 6151
        # cols: decode's four-row body for long rows (float_common.h), two groups and a row alone
        for rows, cols in ((1, 5), (13, 70), (37, 31), (50, 200), (1100, 300), (9, 2100), (9, 6151)):
            w = random_weights(rng, t, rows, cols)
            wd = gguf_dequant(t, w).astype(np.float64)
            for n in (1, 2, 7, 8, 9, 32, 33, 100):
                if rows * n > 40_000:
                    continue
                x = activations(rng, n, cols)
                alone = np.empty((n, rows), np.float32)
                native.set_threads(1)
                for i in range(n):
                    native.matmul(int(t), w, x[i:i + 1], alone[i:i + 1])
                scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T
                # float32 sums of cols products: well within cols * 2^-24 of sum |w x| (seen ~1e-7)
                np.testing.assert_array_less(np.abs(alone - x.astype(np.float64) @ wd.T), 2e-6 * scale + 1e-30)
                for nth in (1, 2):
                    native.set_threads(nth)
                    out = np.full((n, rows), np.nan, np.float32)
                    native.matmul(int(t), w, x, out)
                    np.testing.assert_array_equal(out.view(np.uint32), alone.view(np.uint32),
                                                  err_msg=f"{rows}x{cols}, N={n}, {nth} threads")
    finally:
        native.set_threads(threads())


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_prompt_products_of_wide_rows(variant):
    """Rows longer than a panel's cache budget (panels of the fewest rows) and than the kernel's
    step (the accumulators stored between steps: 1024 values, or 16384 for rows read as stored at
    AVX-512), f16 and bf16, N = 30: more activation bytes than one block (gemm.c: 4 MB, here blocks
    of 12, 12 and 6 rows); every row of the batch has the bits it gets alone."""
    native.select_variant(variant)
    rng = np.random.default_rng(4)
    rows, cols = 7, 60000
    for t in (GT.F16, GT.BF16):
        w = random_weights(rng, t, rows, cols)
        wd = gguf_dequant(t, w).astype(np.float64)
        x = activations(rng, 30, cols)
        out = np.empty((30, rows), np.float32)
        native.matmul(int(t), w, x, out)
        scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        np.testing.assert_array_less(np.abs(out - x.astype(np.float64) @ wd.T), 2e-6 * scale + 1e-30)
        one = np.empty((1, rows), np.float32)
        for i in range(30):
            native.matmul(int(t), w, x[i:i + 1], one)
            np.testing.assert_array_equal(one[0].view(np.uint32), out[i].view(np.uint32), err_msg=f"row {i}")


# The layouts made at load (native.LAYOUTS, llama2.weights.interleaved): a type's rows regrouped,
# every output the base type's own bits.
LAYOUTS = tuple(native.LAYOUTS.values())


def numpy_interleave(w, group, block_bytes):
    """The layout by its definition (native/blocks.h): dword k of block b of row r of a group at
    byte 4 * ((b * dwords_per_block + k) * group + r) of the group."""
    rows, rb = w.shape
    nb, dw = rb // block_bytes, block_bytes // 4
    d = w.view("<u4").reshape(rows // group, group, nb, dw)
    return np.ascontiguousarray(d.transpose(0, 2, 3, 1)).view(np.uint8).reshape(rows, rb)


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
def test_interleave_is_the_layout_byte_for_byte(lay):
    base = GT(native.WEIGHT_TYPES[lay.base].id)
    w = random_weights(np.random.default_rng(3), base, 3 * lay.group, 768)
    out = np.empty_like(w)
    native.interleave(lay.id, w, out)
    np.testing.assert_array_equal(out, numpy_interleave(w, lay.group, native.TYPES[int(base)][2]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
def test_a_layout_gives_its_base_types_bits(lay, variant):
    """Products at every row count (decode rows, multi-row passes, prompts over several tiles) and
    row lookups: bit for bit the base type's, extreme scales included, with 1 and 2 threads."""
    native.select_variant(variant)
    base = int(native.WEIGHT_TYPES[lay.base].id)
    rng = np.random.default_rng(len(variant) + lay.id)
    for rows, cols, extreme in ((lay.group, 256, True), (5 * lay.group, 512, False), (3 * lay.group, 2048, True)):
        w = random_weights(rng, GT(base), rows, cols, extreme=extreme)
        lw = numpy_interleave(w, lay.group, native.TYPES[base][2])
        for nthreads in (1, 2):
            native.set_threads(nthreads)
            for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 130):
                x = activations(rng, n, cols)
                want, got = np.empty((n, rows), np.float32), np.empty((n, rows), np.float32)
                native.matmul(base, w, x, want)
                native.matmul(lay.id, lw, x, got)
                np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{rows}x{cols} n={n}")
        ids = rng.integers(0, rows, 23).astype(np.int64)
        want, got = np.empty((23, cols), np.float32), np.empty((23, cols), np.float32)
        native.dequantize_rows(base, w, ids, want)
        native.dequantize_rows(lay.id, lw, ids, got)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
def test_a_layout_refuses_rows_that_are_not_whole_groups(lay):
    base = GT(native.WEIGHT_TYPES[lay.base].id)
    w = random_weights(np.random.default_rng(4), base, lay.group + 1, 256)
    x, out = np.ones((2, 256), np.float32), np.empty((2, lay.group + 1), np.float32)
    with pytest.raises(ValueError, match=f"groups of {lay.group}; w has {lay.group + 1} rows"):
        native.matmul(lay.id, w, x, out)
    with pytest.raises(ValueError, match="rows a multiple of"):
        native.interleave(lay.id, w, np.empty_like(w))
    with pytest.raises(ValueError, match="not a layout"):
        native.interleave(int(base), w[:lay.group], np.empty_like(w[:lay.group]))
    assert lay.id not in native.TYPES and lay.name not in native.WEIGHT_TYPES  # never a file's type
