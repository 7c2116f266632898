"""ggml's k-quants: Q4_K, Q5_K, Q6_K (super-blocks of 256 values), by llama.cpp's rules without an
importance matrix.

    Q4_K / Q5_K  8 sub-blocks of 32, each x ~ d * sc * q - dmin * m with q 4 (5) bits; the per-sub-block
                 scale and min come from a search over candidate scales (weighted least squares
                 with weights av(|x|) + |x|, keeping the one of least weighted squared error), and
                 are stored as 6-bit multiples of the super-block's float16 d and dmin.
    Q6_K         16 sub-blocks of 16, x ~ d * sc * (q - 32) with q 6 bits and int8 sc; each
                 sub-block's scale is the best of 19 candidates by weighted (x^2) least squares.

llama.cpp's reference (ggml-quants.c quantize_row_q{4,5,6}_K_ref) is a fixed rule computed in float32
with sequential sums; this module follows the same operations in the same order (sums are
np.cumsum's sequential accumulation), vectorized over all sub-blocks at once, so the bytes are
llama.cpp's.
"""

import numpy as np

QK_K = 256
CHUNK = 1 << 12  # super-blocks quantized at once (bounds the temporaries: ~30 x 1M floats)
GROUP_MAX_EPS = np.float32(1e-15)

Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])  # 144
Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                 ("qs", "u1", 128)])  # 176 bytes
Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])  # 210

_F = np.float32


def _seqsum(a):  # [..., n] float32 -> [...]: a[0] + a[1] + ... left to right, in float32
    return np.cumsum(a, axis=-1, dtype=_F)[..., -1]


def _nearest(v):  # ggml's nearest_int: round half to even of a float32
    return np.rint(v).astype(np.int32)


def _affine_search(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants (squared error) on sub-blocks x [S, n] with weights w [S, n].
    -> (scale [S], the_min [S] (>= 0, x ~ scale * L - the_min), L uint8 [S, n])."""
    lo = np.minimum(x.min(axis=1), _F(0))
    hi = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = hi == lo
    span = np.where(flat, _F(1), hi - lo)

    iscale = (_F(nmax) / span).astype(_F)
    scale = (_F(1) / iscale).astype(_F)
    L = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(_F) + lo[:, None] - x
    best = _seqsum(w * (diff * diff))
    mn = lo.copy()
    for step in range(nstep + 1):
        # as in the reference, a candidate once taken moves `min`, and later candidates are
        # placed against the moved min: (max - min) and (x - min) use the current one
        span = np.where(flat | (hi == mn), _F(1), hi - mn)  # hi == mn: undefined in C
        iscale = ((_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / span).astype(_F)
        laux = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = laux.astype(_F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, _F(1)), this_scale)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        cur = _seqsum(w * (diff * diff))
        take = ok & (cur < best)
        L = np.where(take[:, None], laux, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale, mn = np.where(flat, _F(0), scale), np.where(flat, lo, mn)
    return scale.astype(_F), (-mn).astype(_F), L.astype(np.uint8)


def _symmetric_search(x, nmax):
    """ggml's make_qx_quants with rmse_type 1 (weights x^2) on sub-blocks x [S, n].
    -> (scale [S], L uint8 [S, n] in 0..2*nmax-1, i.e. the level + nmax)."""
    idx = np.abs(x).argmax(axis=1)
    amax_v = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(amax_v) < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), amax_v)
    w = x * x
    wx = w * x

    def levels(iscale):  # -> clipped level l [S, n] (float32)
        return np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(_F)

    iscale = (_F(-nmax) / mx).astype(_F)
    lvl = levels(iscale)
    sumlx, suml2 = _seqsum(wx * lvl), _seqsum((w * lvl) * lvl)
    L = lvl
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F(1)), _F(0)).astype(_F)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(_F(nmax) + _F(0.1) * _F(step)) / mx).astype(_F)
        lv = levels(iscale)
        sumlx, suml2 = _seqsum(wx * lv), _seqsum((w * lv) * lv)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take[:, None], lv, L)
        scale = np.where(take, sumlx / np.where(take, suml2, _F(1)), scale)
        best = np.where(take, scale * sumlx, best)
    L = (L.astype(np.int32) + nmax)
    L[zero] = 0
    scale = np.where(zero, _F(0), scale)
    return scale.astype(_F), L.astype(np.uint8)


def _pack_scales(ls, lm):  # 6-bit ls, lm uint8 [B, 8] -> the 12 scale bytes of Q4_K / Q5_K [B, 12]
    out = np.zeros((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _scale_min_search(x, nmax, rmin, nstep):  # x [B, 256] -> d, dmin (float16 [B]), ls, lm, L
    sub = x.reshape(-1, 32)
    av = np.sqrt(_seqsum(sub * sub) / _F(32)).astype(_F)
    w = av[:, None] + np.abs(sub)
    scales, mins, L = _affine_search(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    L = L.reshape(len(x), QK_K)
    max_scale = np.maximum(scales.max(axis=1), _F(0))  # starts from 0, as the reference's loop
    max_min = np.maximum(mins.max(axis=1), _F(0))
    inv_scale = np.where(max_scale > 0, _F(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(_F)
    inv_min = np.where(max_min > 0, _F(63) / np.where(max_min > 0, max_min, 1), 0).astype(_F)
    ls = np.minimum(_nearest(inv_scale[:, None] * scales).astype(np.uint8), 63)  # uint8 cast, then MIN
    lm = np.minimum(_nearest(inv_min[:, None] * mins).astype(np.uint8), 63)
    d = (max_scale / _F(63)).astype(np.float16)
    dmin = (max_min / _F(63)).astype(np.float16)
    # requantize against the stored (rounded) scales; sub-blocks whose scale is 0 keep the search's L
    dd = d.astype(_F)[:, None] * ls.astype(_F)  # [B, 8]
    dm = dmin.astype(_F)[:, None] * lm.astype(_F)
    xs = x.reshape(-1, 8, 32)
    nz = dd != 0
    q = _nearest((xs + dm[:, :, None]) / np.where(nz, dd, _F(1))[:, :, None])
    q = np.clip(q, 0, nmax).astype(np.uint8)
    L = np.where(nz[:, :, None], q, L.reshape(-1, 8, 32)).reshape(-1, QK_K)
    return d, dmin, ls, lm, L


def _q4_k(x, out):
    d, dmin, ls, lm, L = _scale_min_search(x, 15, -1.0, 20)
    out["d"], out["dmin"], out["scales"] = d, dmin, _pack_scales(ls, lm)
    L = L.reshape(-1, 4, 2, 32)  # 64-value groups: low nibbles the first 32, high the next 32
    out["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _q5_k(x, out):
    d, dmin, ls, lm, L = _scale_min_search(x, 31, -0.5, 15)
    out["d"], out["dmin"], out["scales"] = d, dmin, _pack_scales(ls, lm)
    L = L.reshape(-1, 8, 32)  # sub-block j's fifth bits go to bit j of qh[0..31]
    out["qh"] = ((L >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    low = (L & 0x0F).reshape(-1, 4, 2, 32)
    out["qs"] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)


def _q6_k(x, out):
    sub = x.reshape(-1, 16)
    scales, L = _symmetric_search(sub, 32)
    scales = scales.reshape(-1, 16)
    L = L.reshape(len(x), 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # the reference zeroes such a super-block
    iscale = (_F(-128) / np.where(zero, _F(1), max_scale)).astype(_F)
    d = (_F(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    dd = d.astype(_F)[:, None] * sc.astype(_F)  # [B, 16]
    nz = dd != 0
    q = np.clip(_nearest(x.reshape(-1, 16, 16) / np.where(nz, dd, _F(1))[:, :, None]), -32, 31) + 32
    L = np.where(nz[:, :, None], q.astype(np.uint8), L).reshape(-1, 2, 4, 32)  # [B, half, quarter, 32]
    L[zero] = 0
    sc[zero], d[zero] = 0, 0
    out["ql"] = ((L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)).reshape(-1, 128)
    hi = (L >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    out["qh"] = hi.sum(axis=2, dtype=np.uint8).reshape(-1, 64)
    out["scales"], out["d"] = sc, d


TYPES = {"q4_k": (Q4_K, _q4_k), "q5_k": (Q5_K, _q5_k), "q6_k": (Q6_K, _q6_k)}


def quantize_blocks(x, name):  # x float32 [N] (N a multiple of 256) -> structured blocks [N / 256]
    block, rule = TYPES[name]
    x = np.ascontiguousarray(x, _F).reshape(-1, QK_K)
    out = np.empty(len(x), block)
    with np.errstate(under="ignore"):  # tiny values underflow quietly, as in C
        for b0 in range(0, len(x), CHUNK):
            rule(x[b0:b0 + CHUNK], out[b0:b0 + CHUNK])
    return out
