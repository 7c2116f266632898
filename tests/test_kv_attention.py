"""The native decode attention (native/attention.c) against a numpy reference, for every KV type,
every compiled variant this CPU runs, grouped-query heads and scattered block tables."""

import numpy as np
import pytest

from llama2 import kvcache, native

VARIANTS = native.variants()


@pytest.fixture(autouse=True)
def _restore_level():
    before = native.variant()
    yield
    native.select_variant(before)


def reference(t, q, kpool, vpool, tables, lens):  # numpy: decode every row, softmax in float64
    B, H, hd = q.shape
    KVH, bt = kpool.shape[1], kpool.shape[2]
    out = np.zeros((B, H * hd), np.float64)
    for b in range(B):
        n = lens[b]
        ids = tables[b, :-(-n // bt)]
        for h in range(H):
            g = h // (H // KVH)
            k = t.decode(kpool[ids, g].reshape(-1, kpool.shape[3])[:n], hd).astype(np.float64)
            v = t.decode(vpool[ids, g].reshape(-1, vpool.shape[3])[:n], hd).astype(np.float64)
            s = k @ q[b, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[b, h * hd:(h + 1) * hd] = (p / p.sum()) @ v
    return out


def make(rng, t, blocks, kvh, bt, hd):
    x = rng.standard_normal((2, blocks, kvh, bt, hd)).astype(np.float32) * 2
    enc = t.encode(x)
    return np.ascontiguousarray(enc[0]), np.ascontiguousarray(enc[1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_type", list(kvcache.TYPES))
@pytest.mark.parametrize("hd,H,KVH", [(8, 8, 4), (32, 4, 4), (64, 8, 2), (128, 4, 1)])
def test_decode_attention_equals_reference(variant, kv_type, hd, H, KVH):
    native.select_variant(variant)
    rng = np.random.default_rng(hd + H)
    t = kvcache.TYPES[kv_type]
    blocks, bt, B = 24, 16, 5
    kpool, vpool = make(rng, t, blocks, KVH, bt, hd)
    lens = np.array([1, 15, 16, 17, 70], np.int64)
    maxb = 6
    tables = np.zeros((B, maxb), np.int32)
    perm = rng.permutation(blocks)  # each sequence's blocks scattered over the pool
    for b in range(B):
        tables[b] = perm[(b * 4 + np.arange(maxb)) % blocks]
    q = rng.standard_normal((B, H, hd)).astype(np.float32)
    out = np.empty((B, H * hd), np.float32)
    native.attention_decode(t.ID, q, kpool, vpool, tables, lens, out)
    np.testing.assert_allclose(out, reference(t, q, kpool, vpool, tables, lens), rtol=2e-5, atol=2e-5)


def test_decode_attention_does_not_depend_on_threads_or_batch():
    from llama2.threads import set_threads, threads
    rng = np.random.default_rng(1)
    t = kvcache.TYPES["f16"]
    kpool, vpool = make(rng, t, 40, 2, 16, 64)
    tables = rng.permutation(40)[:32].reshape(4, 8).astype(np.int32)
    lens = np.array([128, 3, 77, 100], np.int64)
    q = rng.standard_normal((4, 8, 64)).astype(np.float32)
    both = np.empty((4, 512), np.float32)
    native.attention_decode(t.ID, q, kpool, vpool, tables, lens, both)
    before = threads()
    try:
        for n in (1, 2):
            set_threads(n)
            for b in range(4):
                one = np.empty((1, 512), np.float32)
                native.attention_decode(t.ID, q[b:b + 1].copy(), kpool, vpool, tables[b:b + 1].copy(),
                                        lens[b:b + 1].copy(), one)
                np.testing.assert_array_equal(one[0], both[b])
    finally:
        set_threads(before)


def test_decode_attention_rejects_blocks_outside_the_pool_and_bad_lengths():
    t = kvcache.TYPES["f32"]
    kpool = np.zeros((4, 1, 16, 4 * 8), np.uint8)
    q = np.zeros((1, 2, 8), np.float32)
    out = np.empty((1, 16), np.float32)
    with pytest.raises(IndexError, match="block 4 of a pool of 4"):
        native.attention_decode(t.ID, q, kpool, kpool, np.array([[4]], np.int32), np.array([3]), out)
    with pytest.raises(ValueError, match="attends 17 rows"):
        native.attention_decode(t.ID, q, kpool, kpool, np.array([[0]], np.int32), np.array([17]), out)
    with pytest.raises(ValueError, match="KV type 9"):
        native.attention_decode(9, q, kpool, kpool, np.array([[0]], np.int32), np.array([1]), out)


@pytest.mark.parametrize("hd", [8, 64])
def test_kv_type_round_trips(hd):
    rng = np.random.default_rng(hd)
    x = (rng.standard_normal((50, 3, hd)) * rng.uniform(0.01, 10, (50, 3, 1))).astype(np.float32)
    T = kvcache.TYPES
    assert np.array_equal(T["f32"].decode(T["f32"].encode(x), hd), x)
    assert np.array_equal(T["f16"].decode(T["f16"].encode(x), hd), x.astype(np.float16).astype(np.float32))
    b = T["bf16"].decode(T["bf16"].encode(x), hd)
    assert np.all(np.abs(b - x) <= np.abs(x) * 2.0 ** -8)  # half an ulp of an 8-bit mantissa
    exact = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # representable: kept as is
    assert np.array_equal(T["bf16"].decode(T["bf16"].encode(exact), hd), exact)
    q = T["q8_0"].decode(T["q8_0"].encode(x), hd)
    g = min(32, hd)
    amax = np.abs(x.reshape(50, 3, hd // g, g)).max(-1, keepdims=True)
    err = np.abs(q - x).reshape(50, 3, hd // g, g)
    assert np.all(err <= amax / 127 * 0.5 * 1.01 + amax * 2.0 ** -11)  # half a step, plus d's fp16 rounding
    assert T["q8_0"].encode(x).shape[-1] == T["q8_0"].row_bytes(hd) == hd // g * (g + 2)
    zeros = np.zeros((2, hd), np.float32)
    assert np.array_equal(T["q8_0"].decode(T["q8_0"].encode(zeros), hd), zeros)
