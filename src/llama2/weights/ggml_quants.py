"""llama.cpp's reference quantization steps that several weight types share (ggml-quants.c,
quantize_row_*_ref and the k-quants' scale searches, without an importance matrix), and the loop
that quantizes a matrix block by block. Each type's own rule is in its module (weights/<type>.py).

Every step is done in float32 in the reference's order: sums are sequential (np.cumsum's
accumulation), rounding is the reference's (nearest: half to even; roundf: half away from zero),
so the bytes are llama.cpp's. Searches run vectorized over all (sub-)blocks at once.
"""

import numpy as np

CHUNK_VALUES = 1 << 20  # values quantized at once (bounds the float32 temporaries: ~30 x 1M floats)
# The most the quantizers hold beside their input and output: one chunk's float32 temporaries
# (about 30 x CHUNK_VALUES floats), for memory.py.
SCRATCH_BYTES = 128 << 20
GROUP_MAX_EPS = np.float32(1e-15)

_F = np.float32


def quantize_blocks(w, dtype, block, rule):
    """w float32 [rows, cols] (cols a multiple of `block`) -> blocks [rows, cols / block] of `dtype`,
    `rule(x float32 [B, block], out [B] of dtype)` filling CHUNK_VALUES values' blocks at a time."""
    rows = len(w)
    x = np.ascontiguousarray(w, _F).reshape(-1, block)
    out = np.empty(len(x), dtype)
    step = max(1, CHUNK_VALUES // block)
    with np.errstate(under="ignore"):  # tiny values underflow quietly, as in C
        for b0 in range(0, len(x), step):
            rule(x[b0:b0 + step], out[b0:b0 + step])
    return out.reshape(rows, -1)


# The 32-value blocks (Q4_0 .. Q8_0)

def inverse(d):  # [B] float32 -> 1/d, 0 where d == 0 (as `id = d ? 1/d : 0`)
    return np.divide(_F(1), d, out=np.zeros_like(d), where=d != 0)


def signed_max(x):  # x [B, 32] -> [B]: the value of largest magnitude (first on ties), sign kept
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def pack_nibbles(q):  # q uint8 [B, 32] (values < 16 after masking) -> qs [B, 16]
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def pack_high_bits(q):  # q uint8 [B, 32] of 5-bit values -> qh uint8 [B, 4]: bit j of the word = bit 4 of value j
    bits = ((q >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return word.astype("<u4")[:, None].view(np.uint8)


def symmetric(x, levels):  # Q4_0 (levels 16) / Q5_0 (32): -> (d float32 [B], q uint8 [B, 32])
    d = (signed_max(x) / _F(-levels // 2)).astype(_F)
    v = x * inverse(d)[:, None] + _F(levels // 2 + 0.5)
    return d, np.minimum(levels - 1, np.trunc(v)).astype(np.uint8)


def affine(x, levels, clamp):  # Q4_1 (16) / Q5_1 (32): -> (d, min, q uint8 [B, 32])
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = ((hi - lo) / _F(levels - 1)).astype(_F)
    v = np.trunc((x - lo[:, None]) * inverse(d)[:, None] + _F(0.5))
    if clamp:
        v = np.minimum(levels - 1, v)
    return d, lo, v.astype(np.uint8)



# The k-quants (Q4_K, Q5_K, Q6_K)

def seqsum(a):  # [..., n] float32 -> [...]: a[0] + a[1] + ... left to right, in float32
    return np.cumsum(a, axis=-1, dtype=_F)[..., -1]


def nearest(v):  # ggml's nearest_int: round half to even of a float32
    return np.rint(v).astype(np.int32)


def affine_search(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants (squared error) on sub-blocks x [S, n] with weights w [S, n].
    -> (scale [S], the_min [S] (>= 0, x ~ scale * L - the_min), L uint8 [S, n])."""
    lo = np.minimum(x.min(axis=1), _F(0))
    hi = x.max(axis=1)
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    flat = hi == lo
    span = np.where(flat, _F(1), hi - lo)

    iscale = (_F(nmax) / span).astype(_F)
    scale = (_F(1) / iscale).astype(_F)
    L = np.clip(nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(_F) + lo[:, None] - x
    best = seqsum(w * (diff * diff))
    mn = lo.copy()
    for step in range(nstep + 1):
        # as in the reference, a candidate once taken moves `min`, and later candidates are
        # placed against the moved min: (max - min) and (x - min) use the current one
        span = np.where(flat | (hi == mn), _F(1), hi - mn)  # hi == mn: undefined in C
        iscale = ((_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / span).astype(_F)
        laux = np.clip(nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = laux.astype(_F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, _F(1)), this_scale)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        cur = seqsum(w * (diff * diff))
        take = ok & (cur < best)
        L = np.where(take[:, None], laux, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale, mn = np.where(flat, _F(0), scale), np.where(flat, lo, mn)
    return scale.astype(_F), (-mn).astype(_F), L.astype(np.uint8)


def symmetric_search(x, nmax):
    """ggml's make_qx_quants with rmse_type 1 (weights x^2) on sub-blocks x [S, n].
    -> (scale [S], L uint8 [S, n] in 0..2*nmax-1, i.e. the level + nmax)."""
    idx = np.abs(x).argmax(axis=1)
    amax_v = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(amax_v) < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), amax_v)
    w = x * x
    wx = w * x

    def levels(iscale):  # -> clipped level l [S, n] (float32)
        return np.clip(nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(_F)

    iscale = (_F(-nmax) / mx).astype(_F)
    lvl = levels(iscale)
    sumlx, suml2 = seqsum(wx * lvl), seqsum((w * lvl) * lvl)
    L = lvl
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F(1)), _F(0)).astype(_F)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(_F(nmax) + _F(0.1) * _F(step)) / mx).astype(_F)
        lv = levels(iscale)
        sumlx, suml2 = seqsum(wx * lv), seqsum((w * lv) * lv)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take[:, None], lv, L)
        scale = np.where(take, sumlx / np.where(take, suml2, _F(1)), scale)
        best = np.where(take, scale * sumlx, best)
    L = (L.astype(np.int32) + nmax)
    L[zero] = 0
    scale = np.where(zero, _F(0), scale)
    return scale.astype(_F), L.astype(np.uint8)


def pack_scales(ls, lm):  # 6-bit ls, lm uint8 [B, 8] -> the 12 scale bytes of Q4_K / Q5_K [B, 12]
    out = np.zeros((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def scale_min_search(x, nmax, rmin, nstep):  # x [B, 256] -> d, dmin (float16 [B]), ls, lm, L
    sub = x.reshape(-1, 32)
    av = np.sqrt(seqsum(sub * sub) / _F(32)).astype(_F)
    w = av[:, None] + np.abs(sub)
    scales, mins, L = affine_search(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    L = L.reshape(len(x), 256)
    max_scale = np.maximum(scales.max(axis=1), _F(0))  # starts from 0, as the reference's loop
    max_min = np.maximum(mins.max(axis=1), _F(0))
    inv_scale = np.where(max_scale > 0, _F(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(_F)
    inv_min = np.where(max_min > 0, _F(63) / np.where(max_min > 0, max_min, 1), 0).astype(_F)
    ls = np.minimum(nearest(inv_scale[:, None] * scales).astype(np.uint8), 63)  # uint8 cast, then MIN
    lm = np.minimum(nearest(inv_min[:, None] * mins).astype(np.uint8), 63)
    d = (max_scale / _F(63)).astype(np.float16)
    dmin = (max_min / _F(63)).astype(np.float16)
    # requantize against the stored (rounded) scales; sub-blocks whose scale is 0 keep the search's L
    dd = d.astype(_F)[:, None] * ls.astype(_F)  # [B, 8]
    dm = dmin.astype(_F)[:, None] * lm.astype(_F)
    xs = x.reshape(-1, 8, 32)
    nz = dd != 0
    q = nearest((xs + dm[:, :, None]) / np.where(nz, dd, _F(1))[:, :, None])
    q = np.clip(q, 0, nmax).astype(np.uint8)
    L = np.where(nz[:, :, None], q, L.reshape(-1, 8, 32)).reshape(-1, 256)
    return d, dmin, ls, lm, L
