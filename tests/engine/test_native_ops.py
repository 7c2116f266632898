"""The native elementwise operations (rmsnorm, rope, silu_mul) and version-2 Q8 in any layout, at
every instruction-set variant this CPU runs, against numpy references of the same arithmetic."""

import numpy as np
import pytest

import forward_reference as R
from conftest import golden_cases
from llama2 import native, rope
from llama2.config import ModelConfig
from llama2.weights import int8_groups

VARIANTS = native.variants()
F32 = np.float32


def _rope_tables(head_dim, seq_len, theta):  # unscaled RoPE tables of a head size (llama2.rope)
    return rope.tables(ModelConfig(dim=head_dim, hidden_dim=1, n_layers=1, n_heads=1, n_kv_heads=1,
                                   vocab_size=1, seq_len=seq_len, rope_theta=theta))


pytestmark = pytest.mark.usefixtures("restore_level")  # conftest.py


def ref_rmsnorm(x, w, eps):  # run.c's order: ss = x0*x0 + x1*x1 + ... in float32, left to right
    ss = np.add.accumulate(x * x, axis=1, dtype=F32)[:, -1]
    inv = F32(1.0) / np.sqrt(ss / F32(x.shape[1]) + F32(eps), dtype=F32)
    return w * (x * inv[:, None])


def runc_rmsnorm(x, w, eps):  # run.c's loop, one float32 operation at a time (the reference's reference)
    out = np.empty_like(x)
    for r in range(len(x)):
        ss = F32(0.0)
        for v in x[r]:
            ss = F32(ss + F32(v * v))
        ss = F32(F32(1.0) / np.sqrt(F32(ss / F32(len(x[r])) + F32(eps))))
        out[r] = w * (ss * x[r])
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [1, 7, 64, 288, 4096])
def test_rmsnorm_is_bit_equal_to_runc_order(variant, d):
    native.select_variant(variant)
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * 3).astype(F32)
    w = rng.standard_normal(d).astype(F32)
    out = native.rmsnorm(x, w, 1e-5, np.empty_like(x))
    np.testing.assert_array_equal(out, ref_rmsnorm(x, w, 1e-5))
    if d <= 288:
        np.testing.assert_array_equal(out, runc_rmsnorm(x, w, 1e-5))
    np.testing.assert_allclose(out, R.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)  # numpy's own sum order
    inplace = x.copy()
    native.rmsnorm(inplace, w, 1e-5, inplace)  # out may be x
    np.testing.assert_array_equal(inplace, out)
    np.testing.assert_array_equal(native.rmsnorm(x[0], w, 1e-5, np.empty(d, F32)), out[0])  # one row as [D]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("style", ["interleaved", "halves"])
@pytest.mark.parametrize("shape", [(1, 6, 48), (7, 4, 64), (3, 2, 2)])
def test_rope_is_bit_equal_to_the_numpy_reference(variant, style, shape):
    native.select_variant(variant)
    N, H, hd = shape
    rng = np.random.default_rng(N * H + hd)
    cos_t, sin_t = _rope_tables(hd, 64, 10000.0)
    pos = rng.integers(0, 64, N)
    x = rng.standard_normal(shape).astype(F32)
    want = R.rope(x, cos_t[pos], sin_t[pos], style)
    got = x.copy()
    assert native.rope(got, cos_t[pos], sin_t[pos], style) is got
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_silu_mul_matches_libm_expf(variant):
    native.select_variant(variant)
    rng = np.random.default_rng(3)
    a = np.concatenate([(rng.standard_normal((4, 1000)) * 4).astype(F32),
                        np.array([[0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 1e-30, -1e-30] * 125], F32)])
    b = rng.standard_normal(a.shape).astype(F32)
    # expf correctly rounded (glibc's is within 0.502 ulp), then run.c's float32 operations
    with np.errstate(over="ignore"):
        e = np.exp(-a.astype(np.float64)).astype(F32)
        want = a / (F32(1.0) + e) * b
        numpy_silu = R.silu_mul(a.copy(), b)
    got = a.copy()
    assert native.silu_mul(got, b) is got
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)
    np.testing.assert_allclose(got, numpy_silu, rtol=1e-6, atol=1e-37)
    if variant != VARIANTS[-1]:
        native.select_variant(VARIANTS[-1])
        other = a.copy()
        np.testing.assert_array_equal(native.silu_mul(other, b), got)  # every level alike


def ref_int8_flat(q, s, gs, x):  # segment by segment, as matmul_int8_flat sums (tolerance: lane order)
    rows, cols = q.shape
    w = int8_groups.dequantize(q, s, gs)
    return x.astype(np.float64) @ w.astype(np.float64).T


LAYOUTS = [(37, 30, 8), (64, 172, 8), (16, 96, 32), (9, 64, 64), (5, 13, 7), (12, 256, 64), (3, 100, 1000)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows,cols,gs", LAYOUTS)
def test_int8_flat_layout(variant, rows, cols, gs):
    native.select_variant(variant)
    rng = np.random.default_rng(rows * cols + gs)
    m = int8_groups.quantize(rng.standard_normal((rows, cols)).astype(F32), gs)
    ids = rng.integers(0, rows, 11).astype(np.int64)
    out = np.empty((11, cols), F32)
    native.dequantize_int8(m.q, m.s, gs, ids, out)
    np.testing.assert_array_equal(out, int8_groups.dequantize(m.q, m.s, gs)[ids])
    for n in (1, 3, 9):
        x = rng.standard_normal((n, cols)).astype(F32)
        got = np.empty((n, rows), F32)
        native.matmul_int8_flat(m.q, m.s, gs, x, got)
        want = ref_int8_flat(m.q, m.s, gs, x)
        bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(m.dequantize()).T.astype(np.float64)) + 1e-6
        assert (np.abs(got - want) <= bound).all()
        for r in range(n):  # a row's result does not depend on the others
            one = np.empty((1, rows), F32)
            native.matmul_int8_flat(m.q, m.s, gs, x[r:r + 1], one)
            np.testing.assert_array_equal(one[0], got[r])
        if variant == VARIANTS[0]:
            continue
        native.select_variant(VARIANTS[0])  # bits equal at every level ...
        again = np.empty_like(got)
        native.matmul_int8_flat(m.q, m.s, gs, x, again)
        np.testing.assert_array_equal(again, got)
        native.set_threads(1)  # ... and thread count
        native.matmul_int8_flat(m.q, m.s, gs, x, again)
        np.testing.assert_array_equal(again, got)
        native.set_threads(2)
        native.select_variant(variant)


def test_shape_errors_are_one_line():
    x = np.zeros((2, 8), F32)
    cases = [
        (lambda: native.rmsnorm(x, np.zeros(7, F32), 1e-5, np.empty_like(x)), r"rmsnorm: w must be float32 \[8\]"),
        (lambda: native.rmsnorm(x, np.zeros(8, F32), 1e-5, np.empty((2, 7), F32)), "rmsnorm: out must have"),
        (lambda: native.rope(np.zeros((2, 1, 8), F32), np.zeros((2, 4), F32), np.zeros((2, 4), F32), "odd"),
         "rope: style must be"),
        (lambda: native.rope(np.zeros((2, 1, 8), F32), np.zeros((2, 3), F32), np.zeros((2, 4), F32), "halves"),
         r"rope: cos must be float32 \[2, 4\]"),
        (lambda: native.silu_mul(x, np.zeros((2, 7), F32)), "silu_mul: a and b must be"),
        (lambda: native.matmul_int8_flat(np.zeros((3, 8), np.int8), np.zeros(2, F32), 8, x, np.empty((2, 3), F32)),
         "matmul_int8_flat: s must be float32 with at least 3 scales"),
        (lambda: native.dequantize_int8(np.zeros((3, 8), np.int8), np.zeros(3, F32), 8,
                                            np.array([3]), np.empty((1, 8), F32)), "row 3 is outside"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, IndexError), match=message) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", golden_cases("runc.jsonl"))
def test_runc_goldens_with_the_native_elementwise_ops(case, monkeypatch, tmp_path):
    """Every run.c golden, byte for byte, with every pass the step-by-step reference
    (tests/forward_reference.py) on the native RMSNorm: run.c's sequential sum, not the forward
    pass's einsum order."""
    import io

    from conftest import asset
    from llama2.cli import main
    from llama2.model import Transformer

    def rmsnorm(x, w, eps):
        x = np.ascontiguousarray(x, dtype=F32)
        return native.rmsnorm(x, np.ascontiguousarray(w, dtype=F32), eps, np.empty_like(x))

    monkeypatch.setattr(R, "rmsnorm", rmsnorm)
    monkeypatch.setattr(Transformer, "forward_batch",
                        lambda self, segments, cache, all_logits=False, adapters=None:
                        R.forward_batch(self, segments, cache, all_logits))  # run.c: no adapters
    monkeypatch.chdir(tmp_path)
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset(case["model"])), "-z", str(asset(case["tokenizer"])), *case["args"]],
                stdout=out, stderr=err, stdin=io.StringIO(""))
    assert code == 0, err.getvalue()
    assert out.getvalue() == bytes.fromhex(case["stdout_hex"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_silu_mul_on_the_pool_equals_one_thread(variant):
    """A prompt's gate (past 2^15 values) is split over the pool's threads: the same bits as one."""
    native.select_variant(variant)
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((37, 1777)) * 4).astype(F32)  # 65749 values: ranges not multiples of 16
    b = rng.standard_normal(a.shape).astype(F32)
    native.set_threads(1)
    one = native.silu_mul(a.copy(), b)
    for n in (2, 3, 7):
        native.set_threads(n)
        assert native.silu_mul(a.copy(), b).tobytes() == one.tobytes()
