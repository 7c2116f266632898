"""The native attention (native/attention.c) against a float64 numpy reference, for every KV type,
every compiled variant this CPU runs, grouped-query and multi-head shapes and scattered block
tables: decode rows (attention_decode) and a pass's segments (attention: prompts from position 0,
prompts continuing a cached sequence, decode rows), whose every row has the bits of a decode row."""

import numpy as np
import pytest

from llama2 import kvcache, native
from llama2.errors import UsageError

VARIANTS = native.variants()


pytestmark = pytest.mark.usefixtures("restore_level")  # conftest.py


def reference(t, q, kpool, vpool, tables, lens):  # numpy: decode every row, softmax in float64
    B, H, hd = q.shape
    KVH, bt = kpool.shape[1], kpool.shape[2]
    out = np.zeros((B, H * hd), np.float64)
    for b in range(B):
        n = lens[b]
        ids = tables[b, :-(-n // bt)]
        for h in range(H):
            g = h // (H // KVH)
            k = t.reference.decode(kpool[ids, g].reshape(-1, kpool.shape[3])[:n], hd).astype(np.float64)
            v = t.reference.decode(vpool[ids, g].reshape(-1, vpool.shape[3])[:n], hd).astype(np.float64)
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


# -- a pass's attention: segments of prompt rows and decode rows ---------------------------------

# (first position, rows): prompts from position 0 (within a block, across several), one continuing
# a cached sequence from inside a block (a chat's second turn, a reused prefix), decode rows.
SEGMENTS = [(0, 37), (5, 1), (20, 13), (0, 1), (3, 60), (32, 4)]
SHAPES = [(8, 8, 4), (32, 4, 4), (64, 32, 4), (128, 4, 1), (12, 6, 2), (16, 16, 1)]  # hd, H, KVH


def segments_case(rng, kv_type, hd, H, KVH, segments=SEGMENTS, scale=1.0):
    """Pools of scattered blocks, each segment its own table -> (t, q, kpool, vpool, tables, starts,
    counts) with q [N, H, hd] for the segments' rows one after the other."""
    t = kvcache.TYPES[kv_type]
    blocks, bt, maxb = 24, 16, 6
    kpool, vpool = make(rng, t, blocks, KVH, bt, hd)
    tables = np.stack([rng.permutation(blocks)[:maxb] for _ in segments]).astype(np.int32)
    starts = np.array([s for s, _ in segments], np.int64)
    counts = np.array([n for _, n in segments], np.int64)
    q = (rng.standard_normal((int(counts.sum()), H, hd)) * scale).astype(np.float32)
    return t, q, kpool, vpool, tables, starts, counts


def per_row(tables, starts, counts):  # each row's table and the rows it attends (its position + 1)
    rows = np.ascontiguousarray(np.repeat(tables, counts, axis=0))
    lens = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in zip(starts, counts)]).astype(np.int64)
    return rows, lens


def skip_if_unfit(kv_type, hd):
    t = kvcache.TYPES[kv_type]
    if not t.holds(hd):
        pytest.skip(f"{kv_type} rows need {t.needs}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_type", list(kvcache.TYPES))
@pytest.mark.parametrize("hd,H,KVH", SHAPES)
def test_attention_equals_reference(variant, kv_type, hd, H, KVH):
    # Bound: |ours - float64| <= 2e-5 + 2e-5 |ref| per value (seen: under 4e-6 at every variant).
    skip_if_unfit(kv_type, hd)
    native.select_variant(variant)
    t, q, kpool, vpool, tables, starts, counts = segments_case(np.random.default_rng(hd * H), kv_type, hd, H, KVH)
    out = np.empty((len(q), H * hd), np.float32)
    native.attention(t.ID, q, kpool, vpool, tables, starts, counts, out)
    np.testing.assert_allclose(out, reference(t, q, kpool, vpool, *per_row(tables, starts, counts)),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_type", ["f32", "f16", "bf16"])
def test_softmax_over_scores_spread_widely(variant, kv_type):
    """Small integers in q and k and head_dim 64 (root 8): every score is exact in float32, and they
    lie up to about 200 below their row's largest, so exp runs over its whole range and past its
    cutoff at -87 (such a term is under 2^-125 of the largest); what is left to err is exp, the sum
    and the weighted sum of values."""
    native.select_variant(variant)
    rng = np.random.default_rng(3)
    t = kvcache.TYPES[kv_type]
    hd, H, KVH, blocks, bt = 64, 8, 2, 8, 16
    k = rng.integers(-3, 4, (blocks, KVH, bt, hd)).astype(np.float32)
    v = rng.standard_normal((blocks, KVH, bt, hd)).astype(np.float32)
    kpool, vpool = np.ascontiguousarray(t.encode(k)), np.ascontiguousarray(t.encode(v))
    tables = rng.permutation(blocks)[None].astype(np.int32)
    starts, counts = np.array([40], np.int64), np.array([88], np.int64)
    q = rng.integers(-20, 21, (88, H, hd)).astype(np.float32)
    out = np.empty((88, H * hd), np.float32)
    native.attention(t.ID, q, kpool, vpool, tables, starts, counts, out)
    np.testing.assert_allclose(out, reference(t, q, kpool, vpool, *per_row(tables, starts, counts)),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # every level x KV type x threads/window
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_type", list(kvcache.TYPES))
def test_every_row_has_the_bits_of_a_decode_row(variant, kv_type, threads):
    from llama2.threads import set_threads
    before = native._native.threads()
    native.select_variant(variant)
    try:
        set_threads(threads)
        for hd, H, KVH in SHAPES:
            if kv_type == "q8_0" and hd % min(32, hd):
                continue
            t, q, kpool, vpool, tables, starts, counts = segments_case(np.random.default_rng(hd), kv_type, hd, H, KVH)
            out = np.empty((len(q), H * hd), np.float32)
            native.attention(t.ID, q, kpool, vpool, tables, starts, counts, out)
            decoded = np.empty_like(out)
            native.attention_decode(t.ID, q, kpool, vpool, *per_row(tables, starts, counts), decoded)
            assert out.tobytes() == decoded.tobytes(), (hd, H, KVH)
    finally:
        set_threads(before)


def test_a_segment_gets_the_same_bits_alone_or_in_a_pass_at_any_thread_count():
    from llama2.threads import set_threads
    before = native._native.threads()
    t, q, kpool, vpool, tables, starts, counts = segments_case(np.random.default_rng(7), "bf16", 64, 16, 2)
    H, hd = 16, 64
    try:
        set_threads(2)
        together = np.empty((len(q), H * hd), np.float32)
        native.attention(t.ID, q, kpool, vpool, tables, starts, counts, together)
        first = np.concatenate([[0], np.cumsum(counts)])
        for n in (1, 2):
            set_threads(n)
            for s in range(len(counts)):
                rows = slice(first[s], first[s + 1])
                alone = np.empty((counts[s], H * hd), np.float32)
                native.attention(t.ID, np.ascontiguousarray(q[rows]), kpool, vpool, tables[s:s + 1].copy(),
                                 starts[s:s + 1].copy(), counts[s:s + 1].copy(), alone)
                assert alone.tobytes() == together[rows].tobytes()
    finally:
        set_threads(before)


def test_attention_rejects_blocks_outside_the_pool_and_bad_segments():
    t = kvcache.TYPES["f32"]
    kpool = np.zeros((4, 1, 16, 4 * 8), np.uint8)
    q = np.zeros((3, 2, 8), np.float32)
    out = np.empty((3, 16), np.float32)
    one = np.array([[0, 1]], np.int32)

    def call(tables, starts, counts, q=q, out=out):
        native.attention(t.ID, q, kpool, kpool, tables, np.array(starts, np.int64), np.array(counts, np.int64), out)

    with pytest.raises(IndexError, match="segment 0 names block 4 of a pool of 4"):
        call(np.array([[0, 4]], np.int32), [15], [3])  # positions 15..17 reach the second block
    with pytest.raises(ValueError, match="positions 30..32; its table holds 0..31"):
        call(one, [30], [3])
    with pytest.raises(ValueError, match="segments hold 2 rows; q has 3"):
        call(np.array([[0], [1]], np.int32), [0, 0], [1, 1])
    with pytest.raises(ValueError, match="positions 0..-1"):
        call(np.array([[0], [1]], np.int32), [0, 0], [3, 0])
    with pytest.raises(ValueError, match="counts must be int64"):
        call(one, [0], [3, 0])
    with pytest.raises(ValueError, match="out must be float32"):
        call(one, [0], [3], out=np.empty((3, 15), np.float32))
    call(one, [29], [3])  # the last positions the table holds


@pytest.mark.parametrize("hd", [8, 64])
def test_kv_type_round_trips(hd):
    """The numpy references (kvcache/<type>.py): what each type keeps of a value."""
    rng = np.random.default_rng(hd)
    x = (rng.standard_normal((50, 3, hd)) * rng.uniform(0.01, 10, (50, 3, 1))).astype(np.float32)
    R = {name: t.reference for name, t in kvcache.TYPES.items()}
    assert np.array_equal(R["f32"].decode(R["f32"].encode(x), hd), x)
    assert np.array_equal(R["f16"].decode(R["f16"].encode(x), hd), x.astype(np.float16).astype(np.float32))
    b = R["bf16"].decode(R["bf16"].encode(x), hd)
    assert np.all(np.abs(b - x) <= np.abs(x) * 2.0 ** -8)  # half an ulp of an 8-bit mantissa
    exact = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # representable: kept as is
    assert np.array_equal(R["bf16"].decode(R["bf16"].encode(exact), hd), exact)
    q = R["q8_0"].decode(R["q8_0"].encode(x), hd)
    g = min(32, hd)
    amax = np.abs(x.reshape(50, 3, hd // g, g)).max(-1, keepdims=True)
    err = np.abs(q - x).reshape(50, 3, hd // g, g)
    assert np.all(err <= amax / 127 * 0.5 * 1.01 + amax * 2.0 ** -11)  # half a step, plus d's fp16 rounding
    assert R["q8_0"].encode(x).shape[-1] == kvcache.TYPES["q8_0"].row_bytes(hd) == hd // g * (g + 2)
    zeros = np.zeros((2, hd), np.float32)
    assert np.array_equal(R["q8_0"].decode(R["q8_0"].encode(zeros), hd), zeros)


def awkward_rows(rng, hd):
    """Rows that exercise every rounding rule: normal values at many scales, halfway cases of f16
    and bf16, f16 subnormals and overflow, zeros, signed zeros, infinities, a row of one value."""
    x = (rng.standard_normal((64, hd)) * np.exp2(rng.integers(-30, 30, (64, 1)))).astype(np.float32)
    bits = x.view(np.uint32)
    bits[1] = (bits[1] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # bf16 halfway, both parities
    bits[2] = (bits[2] & np.uint32(0xFFFFE000)) | np.uint32(0x1000)  # f16 halfway
    x[3] = rng.standard_normal(hd) * 2.0 ** -20  # f16 subnormals
    x[4] = rng.standard_normal(hd) * 7e4  # past f16's largest
    x[5] = 0.0
    x[6] = -0.0
    x[7, ::2] = np.inf
    x[7, 1::2] = -np.inf
    x[8] = 3.0
    x[9, :] = 0.0
    x[9, 0] = 1e-30  # a group whose scale underflows f16
    return x


@pytest.mark.parametrize("kv_type", list(kvcache.TYPES))
@pytest.mark.parametrize("hd", [8, 16, 64, 96])
def test_native_encode_equals_the_reference(kv_type, hd):
    """What the cache is written with (native/kv.h, by prompt passes and the decode step alike) is
    the type's numpy reference, bit for bit, on every awkward value; a NaN stays a NaN."""
    t = kvcache.TYPES[kv_type]
    x = awkward_rows(np.random.default_rng(hd), hd)
    if kv_type == "q8_0":
        x[7] = 5.0  # an infinite max makes numpy's q undefined (inf * 0)
    got = t.encode(x.reshape(8, 8, hd))
    assert got.shape == (8, 8, t.row_bytes(hd))
    with np.errstate(over="ignore"):  # f16's overflow to infinity is the rule, not a mistake
        assert got.tobytes() == t.reference.encode(x).tobytes()
    nan = np.full((1, hd), np.nan, np.float32)
    assert np.isnan(t.reference.decode(t.encode(nan), hd)).all() or kv_type == "q8_0"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_type", list(kvcache.TYPES))
def test_native_decode_equals_the_reference(variant, kv_type):
    """What attention reads (native/kv.h's decode, compiled per variant) is the type's reference
    decode bit for bit: a sequence of one cached row gives it weight exactly 1 (exp(0) = 1, sum 1),
    so the output is the decoded value row, fma(1, v, +0)."""
    native.select_variant(variant)
    t = kvcache.TYPES[kv_type]
    for hd in (8, 16, 64, 96):
        x = awkward_rows(np.random.default_rng(hd), hd)
        if kv_type == "q8_0":
            x[7] = 5.0  # no infinities: numpy's reference q is undefined there
        rows = t.encode(x)  # [B, row_bytes]
        B = len(rows)
        vpool = np.ascontiguousarray(rows.reshape(B, 1, 1, -1))  # each row a block of one position
        out = np.empty((B, hd), np.float32)
        native.attention_decode(t.ID, np.zeros((B, 1, hd), np.float32), np.zeros_like(vpool), vpool,
                                np.arange(B, dtype=np.int32).reshape(B, 1), np.ones(B, np.int64), out)
        with np.errstate(all="ignore"):  # a q8_0 scale past f16's range: inf * 0 is NaN, as in C
            want = t.reference.decode(rows, hd) + np.float32(0)  # + 0 as the fma adds it: -0 becomes +0
        assert out.tobytes() == want.tobytes(), hd


def test_kv_types_come_from_the_native_records():
    """The registry is native/kv.h's list: ids in order, each with its module; a type refuses rows
    it cannot hold, in one line naming the flag."""
    assert [t.ID for t in kvcache.TYPES.values()] == list(range(len(kvcache.TYPES)))
    for name, t in kvcache.TYPES.items():
        assert t.NAME == name and t.reference.__name__ == f"llama2.kvcache.{name}"
        assert t.row_bytes(64) == t.reference.encode(np.zeros((1, 64), np.float32)).shape[-1]
    q8 = kvcache.TYPES["q8_0"]
    assert q8.holds(8) and q8.holds(64) and not q8.holds(48)
    with pytest.raises(UsageError, match="--kv-type q8_0: needs head_dim a multiple of 32"):
        q8.row_bytes(48)
    with pytest.raises(ValueError, match="KV type 9 cannot hold"):
        native.kv_encode(9, np.zeros((1, 8), np.float32), np.zeros(32, np.uint8))
    with pytest.raises(ValueError, match="out must hold 2 rows of 16 bytes"):
        native.kv_encode(1, np.zeros((2, 8), np.float32), np.zeros(31, np.uint8))


# -- a sliding window (Mistral): row p attends rows p-W+1..p ----------------------------------------

def windowed_reference(t, q, kpool, vpool, tables, starts, counts, window):
    """reference()'s arithmetic over each row's last `window` rows only."""
    rows, lens = per_row(tables, starts, counts)
    N, H, hd = q.shape
    KVH = kpool.shape[1]
    out = np.zeros((N, H * hd), np.float64)
    for i in range(N):
        lo = max(0, lens[i] - window)
        for h in range(H):
            g = h // (H // KVH)
            k = t.reference.decode(kpool[rows[i], g].reshape(-1, kpool.shape[3])[lo:lens[i]], hd).astype(np.float64)
            v = t.reference.decode(vpool[rows[i], g].reshape(-1, vpool.shape[3])[lo:lens[i]], hd).astype(np.float64)
            s = k @ q[i, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, h * hd:(h + 1) * hd] = (p / p.sum()) @ v
    return out


@pytest.mark.slow  # every level x KV type x threads/window
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_type", list(kvcache.TYPES))
@pytest.mark.parametrize("window", [1, 7, 16, 23])
def test_sliding_window_attention_equals_reference_and_decode_rows(variant, kv_type, window):
    native.select_variant(variant)
    hd, H, KVH = 32, 8, 2
    t, q, kpool, vpool, tables, starts, counts = segments_case(np.random.default_rng(window), kv_type, hd, H, KVH)
    out = np.empty((len(q), H * hd), np.float32)
    native.attention(t.ID, q, kpool, vpool, tables, starts, counts, out, window)
    np.testing.assert_allclose(out, windowed_reference(t, q, kpool, vpool, tables, starts, counts, window),
                               rtol=2e-5, atol=2e-5)
    # every row has the bits it gets as a decode row of its own, with the blocks before its window
    # released (-1: never read)
    rows, lens = per_row(tables, starts, counts)
    for i in range(len(q)):
        table = rows[i:i + 1].copy()
        table[0, :max(0, lens[i] - window) // kpool.shape[2]] = -1
        one = np.empty((1, H * hd), np.float32)
        native.attention(t.ID, q[i:i + 1].copy(), kpool, vpool, table, lens[i:i + 1] - 1,
                         np.ones(1, np.int64), one, window)
        assert one.tobytes() == out[i].tobytes(), i
    with pytest.raises(IndexError, match="names block -1"):  # a released block inside the window
        table = rows[-1:].copy()
        table[0, (lens[-1] - 1) // kpool.shape[2]] = -1
        native.attention(t.ID, q[-1:].copy(), kpool, vpool, table, lens[-1:] - 1, np.ones(1, np.int64),
                         np.empty((1, H * hd), np.float32), window)
