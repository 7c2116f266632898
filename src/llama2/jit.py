"""Compiled kernels (numba) for the few rows of a decode step, where numpy's per-call overhead and
single-row BLAS calls would dominate. Shapes are written beside each kernel.

Reductions may be reassociated (fastmath 'reassoc'/'contract': SIMD sums and fused multiply-adds),
as run.c compiled with -Ofast does; no approximate math functions are allowed. Every kernel is
parallel over output rows (or heads), so `set_threads` applies to all of them.
"""

import math
import os
import types

import numpy as np

# OpenMP workers spin-wait after each parallel region before sleeping. libgomp's default spin is
# long enough that, on a 2-core machine, the idle workers hold the cores while BLAS runs a prefill
# (half the speed); a short spin still covers the gaps between a decode step's kernels. Read once,
# when numba first starts its OpenMP pool; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from llvmlite import ir  # noqa: E402
from numba import get_num_threads, njit, prange, set_num_threads, types as nbtypes  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

FASTMATH = {"reassoc", "contract", "nsz"}


# Below this many multiply-adds a kernel runs on one thread: waking the others costs more.
PARALLEL_MIN = 1 << 16


def _renamed(fn, suffix):
    """A copy of `fn` under another name: numba's on-disk cache is keyed by the function's name,
    so the parallel and serial builds of one kernel must not share it (the second would load the
    first's machine code)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                              fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    return copy


def _compile(fn):
    """A kernel in two builds, parallel over its outer loop and serial; `fn(work, *args)` picks."""
    parallel = njit(parallel=True, fastmath=FASTMATH, cache=True)(_renamed(fn, "_parallel"))
    serial = njit(parallel=False, fastmath=FASTMATH, cache=True)(_renamed(fn, "_serial"))

    def run(work, *args):
        (parallel if work >= PARALLEL_MIN and get_num_threads() > 1 else serial)(*args)

    run.__name__, run.__doc__ = fn.__name__.lstrip("_"), fn.__doc__
    return run


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int = None):
    """Use `n` threads (default: the cores this process may run on) in our kernels and in BLAS."""
    n = n or available_cores()
    set_num_threads(min(n, _max_threads()))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # BLAS keeps its own default
        pass
    return n


def _max_threads() -> int:
    from numba import config

    return config.NUMBA_NUM_THREADS


def threads() -> int:
    return get_num_threads()


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot_f32(w, i, x, b):  # row i of w [m, n] . row b of x [B, n]
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += w[i, j] * x[b, j]
    return acc


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot4_f32(w, i, x, b):  # rows i..i+3 of w [m, n] . row b of x [B, n] -> four floats
    w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
    xr = x[b]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for j in range(xr.shape[0]):
        xv = xr[j]
        a0 += w0[j] * xv
        a1 += w1[j] * xv
        a2 += w2[j] * xv
        a3 += w3[j] * xv
    return a0, a1, a2, a3


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot_q8(q, s, gs, i, x, b):  # row i of Q8_0 (q [m, n] int8, s [groups]) . row b of x [B, n]
    """Groups run over the flattened matrix, so a row may start or end inside a group: the row is
    walked in segments that each lie in one group, every segment scaled once. Segments are slices,
    so loop indices stay non-negative and the inner loops vectorize."""
    n = q.shape[1]
    qrow, xrow = q[i], x[b]
    acc = np.float32(0.0)
    if n % gs == 0:  # every row holds whole groups
        ng = n // gs
        srow = s[i * ng:(i + 1) * ng]
        for g in range(ng):
            qs, xs = qrow[g * gs:(g + 1) * gs], xrow[g * gs:(g + 1) * gs]
            part = np.float32(0.0)
            for k in range(gs):
                part += np.float32(qs[k]) * xs[k]
            acc += part * srow[g]
        return acc
    base = i * n
    j = 0
    while j < n:
        g = (base + j) // gs
        end = min(n, (g + 1) * gs - base)
        qs, xs = qrow[j:end], xrow[j:end]
        part = np.float32(0.0)
        for k in range(end - j):
            part += np.float32(qs[k]) * xs[k]
        acc += part * s[g]
        j = end
    return acc


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _silu(a):
    return a / (np.float32(1.0) + np.exp(-a))


def _matmul_f32(x, w, out):  # [B, n], [m, n] -> out [B, m]
    """Rows four at a time (more loads in flight when the weights stream from memory: ~10%)."""
    m = w.shape[0]
    if m % 4:
        for i in prange(m):
            for b in range(x.shape[0]):
                out[b, i] = _dot_f32(w, i, x, b)
        return
    for blk in prange(m // 4):
        i = 4 * blk
        for b in range(x.shape[0]):
            out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = _dot4_f32(w, i, x, b)


# How far ahead (bytes) the int8 kernel asks for its weights. One core's hardware prefetcher stops at
# each 4 KiB page and keeps too few lines in flight while the core also converts int8 to float:
# prefetching this far ahead took a 110M-shaped model's int8 products from 9 to 15 GB/s (2 cores).
PREFETCH_AHEAD = 8192


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the CPU to fetch `arr.flat[index]` into cache (LLVM's llvm.prefetch: read, keep)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        name = "llvm.prefetch.p0" if str(ptr.type) == "ptr" else "llvm.prefetch.p0i8"
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), name)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return nbtypes.void(arr, index), codegen


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot4_q8(q, s, gs, i, x, b, fetch):  # rows i..i+3 of Q8_0 (whole groups per row) . row b of x
    """Four rows at a time, group by group: each group's integer products are summed as floats, then
    scaled once. `gs` is a literal where the caller can make it one (fully unrolled groups: ~10%).
    With `fetch`, ask for the weights PREFETCH_AHEAD bytes on, once per 64-byte line of each row."""
    n = q.shape[1]
    ng = n // gs
    flat = q.reshape(-1)
    q0, q1, q2, q3, xrow = q[i], q[i + 1], q[i + 2], q[i + 3], x[b]
    ahead, end = i * n + PREFETCH_AHEAD, flat.shape[0]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for g in range(ng):
        lo = g * gs
        if fetch and (lo & 63) < gs:
            for r in range(4):
                at = ahead + r * n + lo
                if at < end:
                    _prefetch(flat, at)
        xs = xrow[lo:lo + gs]
        r0, r1, r2, r3 = q0[lo:lo + gs], q1[lo:lo + gs], q2[lo:lo + gs], q3[lo:lo + gs]
        p0 = p1 = p2 = p3 = np.float32(0.0)
        for k in range(gs):
            xv = xs[k]
            p0 += np.float32(r0[k]) * xv
            p1 += np.float32(r1[k]) * xv
            p2 += np.float32(r2[k]) * xv
            p3 += np.float32(r3[k]) * xv
        a0 += p0 * s[i * ng + g]
        a1 += p1 * s[(i + 1) * ng + g]
        a2 += p2 * s[(i + 2) * ng + g]
        a3 += p3 * s[(i + 3) * ng + g]
    return a0, a1, a2, a3


def _matmul_q8(x, q, s, gs, out):  # [B, n], int8 [m, n] C-order, f32 [ceil(m*n/gs)], int -> out [B, m]
    """Rows of whole groups go four at a time (four independent dot products per group keep more
    loads in flight: 1.5x faster when the weights come from memory); other rows one by one. The
    first batch row prefetches; the others find the weights in cache."""
    m, n = q.shape
    blocks = m // 4 if n % gs == 0 else 0
    for blk in prange(blocks + (m - 4 * blocks)):
        if blk >= blocks:  # a leftover row, or any row when rows straddle groups
            i = 4 * blocks + (blk - blocks)
            for b in range(x.shape[0]):
                out[b, i] = _dot_q8(q, s, gs, i, x, b)
            continue
        i = 4 * blk
        for b in range(x.shape[0]):
            if gs == 32:
                a0, a1, a2, a3 = _dot4_q8(q, s, 32, i, x, b, b == 0)
            elif gs == 64:
                a0, a1, a2, a3 = _dot4_q8(q, s, 64, i, x, b, b == 0)
            else:
                a0, a1, a2, a3 = _dot4_q8(q, s, gs, i, x, b, b == 0)
            out[b, i], out[b, i + 1], out[b, i + 2], out[b, i + 3] = a0, a1, a2, a3


def _qkv_f32(x, wq, wk, wv, q, k, v):  # [B, D], [D, D], [KV, D], [KV, D] -> q [B, D], k, v [B, KV]
    """The three attention projections in one parallel pass over their rows, four at a time."""
    mq, mk = wq.shape[0], wk.shape[0]
    if mq % 4 or mk % 4:
        for r in prange(mq + 2 * mk):
            for b in range(x.shape[0]):
                if r < mq:
                    q[b, r] = _dot_f32(wq, r, x, b)
                elif r < mq + mk:
                    k[b, r - mq] = _dot_f32(wk, r - mq, x, b)
                else:
                    v[b, r - mq - mk] = _dot_f32(wv, r - mq - mk, x, b)
        return
    nq, nk = mq // 4, mk // 4
    for blk in prange(nq + 2 * nk):
        for b in range(x.shape[0]):
            if blk < nq:
                i = 4 * blk
                q[b, i], q[b, i + 1], q[b, i + 2], q[b, i + 3] = _dot4_f32(wq, i, x, b)
            elif blk < nq + nk:
                i = 4 * (blk - nq)
                k[b, i], k[b, i + 1], k[b, i + 2], k[b, i + 3] = _dot4_f32(wk, i, x, b)
            else:
                i = 4 * (blk - nq - nk)
                v[b, i], v[b, i + 1], v[b, i + 2], v[b, i + 3] = _dot4_f32(wv, i, x, b)


def _ffn_f32(x, w1, w3, out):  # [B, D], [H, D], [H, D] -> out [B, H] = silu(x w1^T) * (x w3^T)
    H = w1.shape[0]
    if H % 4:
        for i in prange(H):
            for b in range(x.shape[0]):
                out[b, i] = _silu(_dot_f32(w1, i, x, b)) * _dot_f32(w3, i, x, b)
        return
    for blk in prange(H // 4):
        i = 4 * blk
        for b in range(x.shape[0]):
            a0, a1, a2, a3 = _dot4_f32(w1, i, x, b)
            c0, c1, c2, c3 = _dot4_f32(w3, i, x, b)
            out[b, i], out[b, i + 1] = _silu(a0) * c0, _silu(a1) * c1
            out[b, i + 2], out[b, i + 3] = _silu(a2) * c2, _silu(a3) * c3


@njit(cache=True)
def dequantize_rows(q, s, gs, rows, out):  # int8 [m, n], f32 [groups], int, int [R] -> out [R, n]
    n = q.shape[1]
    for r in range(len(rows)):
        base = rows[r] * n
        for k in range(n):
            out[r, k] = np.float32(q[rows[r], k]) * s[(base + k) // gs]


def _attention_decode(q, kc, vc, slots, pos, out):
    """One new query per sequence over its cached keys/values (the new key already written).
    q [B, H, hd], kc/vc [slots, KVH, seq_len, hd], slots [B], pos [B] (position of the query)
    -> out [B, H*hd]."""
    B, H, hd = q.shape
    KVH = kc.shape[1]
    g = H // KVH
    root = np.float32(math.sqrt(hd))
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        kv, sl, n = h // g, slots[b], pos[b] + 1
        att = np.empty(n, np.float32)
        mx = np.float32(-np.inf)
        for t in range(n):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[b, h, d] * kc[sl, kv, t, d]
            acc /= root
            att[t] = acc
            mx = max(mx, acc)
        total = np.float32(0.0)
        for t in range(n):
            e = np.float32(math.exp(att[t] - mx))
            att[t] = e
            total += e
        inv = np.float32(1.0) / total
        o = h * hd
        for d in range(hd):
            out[b, o + d] = 0.0
        for t in range(n):
            a = att[t] * inv
            for d in range(hd):
                out[b, o + d] += a * vc[sl, kv, t, d]


def _causal_softmax(scores, start):  # [R, T, S] in place; query t sees keys 0..start+t
    """Scores to probabilities, row by row, over each query's causal window; keys past the window
    get probability 0."""
    R, T, S = scores.shape
    for rt in prange(R * T):
        r, t = rt // T, rt % T
        n = min(start + t + 1, S)
        mx = np.float32(-np.inf)
        for j in range(n):
            mx = max(mx, scores[r, t, j])
        total = np.float32(0.0)
        for j in range(n):
            e = np.float32(math.exp(scores[r, t, j] - mx))
            scores[r, t, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(n):
            scores[r, t, j] *= inv
        for j in range(n, S):
            scores[r, t, j] = np.float32(0.0)


@njit(fastmath=FASTMATH, cache=True)
def rmsnorm(x, weight, eps):  # [N, D], [D], float -> [N, D] (kernels.rmsnorm, compiled)
    N, D = x.shape
    out = np.empty_like(x)
    for n in range(N):
        ss = np.float32(0.0)
        for d in range(D):
            ss += x[n, d] * x[n, d]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for d in range(D):
            out[n, d] = weight[d] * (inv * x[n, d])
    return out


@njit(fastmath=FASTMATH, cache=True)
def rope_(x, cos, sin):  # [N, H, hd] in place, [N, hd/2], [N, hd/2]
    """Rotate each (even, odd) pair of every head of row n by row n's angle (kernels.rope, in place)."""
    N, H, hd = x.shape
    for n in range(N):
        for h in range(H):
            for i in range(hd // 2):
                x0, x1 = x[n, h, 2 * i], x[n, h, 2 * i + 1]
                c, s = cos[n, i], sin[n, i]
                x[n, h, 2 * i] = x0 * c - x1 * s
                x[n, h, 2 * i + 1] = x0 * s + x1 * c


matmul_f32 = _compile(_matmul_f32)
matmul_q8 = _compile(_matmul_q8)
qkv_f32 = _compile(_qkv_f32)
ffn_f32 = _compile(_ffn_f32)
attention_decode = _compile(_attention_decode)
_causal_softmax_kernel = _compile(_causal_softmax)


def causal_softmax(scores, start):  # [R, T, S] in place
    R, T, S = scores.shape
    _causal_softmax_kernel(R * T * S, scores, start)

