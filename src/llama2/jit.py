"""Compiled kernels (numba) for the few rows of a decode step, where numpy's per-call overhead and
single-row BLAS calls would dominate. Shapes are written beside each kernel. Imported on first use
(see `threads`): prompts run on numpy and BLAS alone.

Reductions may be reassociated (fastmath 'reassoc'/'contract': SIMD sums and fused multiply-adds),
as run.c compiled with -Ofast does; no approximate math functions are allowed. Every kernel is
parallel over output rows (or heads), so `threads.set_threads` applies to all of them.
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

from .threads import threads  # noqa: E402

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


def apply_threads(n: int):
    """Run the parallel kernels on `n` threads (at most numba's pool) in the calling thread."""
    from numba import config

    set_num_threads(max(1, min(n, config.NUMBA_NUM_THREADS)))


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot_f32(w, i, x, b):  # row i of w [m, n] . row b of x [B, n]
    acc = np.float32(0.0)
    for j in range(w.shape[1]):
        acc += np.float32(w[i, j]) * x[b, j]
    return acc


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot4_f32(w, i, x, b):  # rows i..i+3 of w [m, n] . row b of x [B, n] -> four floats
    w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
    xr = x[b]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for j in range(xr.shape[0]):
        xv = xr[j]
        a0 += np.float32(w0[j]) * xv
        a1 += np.float32(w1[j]) * xv
        a2 += np.float32(w2[j]) * xv
        a3 += np.float32(w3[j]) * xv
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


# How far ahead (bytes) the int8 kernel asks for its weights. One core's hardware prefetcher stops at
# each 4 KiB page and keeps too few lines in flight while the core also converts int8 to float:
# prefetching this far ahead took a 110M-shaped model's int8 products from 9 to 15 GB/s (2 cores).
PREFETCH_AHEAD = 8192


def _emit_prefetch(builder, ptr):
    """LLVM's llvm.prefetch (read, keep in all cache levels) of the byte at `ptr`."""
    ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
    name = "llvm.prefetch.p0" if str(ptr.type) == "ptr" else "llvm.prefetch.p0i8"  # opaque or typed
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), name)
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _emit_fold(builder, v, width, lanes, flags):
    """Add the halves of vector `v` (`width` lanes) until `lanes` remain."""
    i32 = ir.IntType(32)
    while width > lanes:
        half = width // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half, width))))
        v, width = builder.fadd(lo, hi, flags=flags), half
    return v


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the CPU to fetch `arr.flat[index]` into cache."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        _emit_prefetch(builder, builder.gep(data, [args[1]]))
        return context.get_dummy_value()

    return nbtypes.void(arr, index), codegen


def _vector_dot4_q8(group):
    """An intrinsic computing rows i..i+3 of Q8_0 . row b of x for one literal group size, written
    in LLVM vector IR: numba's loops reduce every group's products to a scalar before scaling it (a
    horizontal sum per group and row), while here each row keeps a 16-lane float accumulator across
    its groups, so the group's products fold into it with one multiply-add by the scale and the
    only horizontal sum is at the row's end (2x faster once the weights are in cache). LLVM picks
    the instructions (AVX-512, AVX2 or SSE), so it is as portable as the loops it replaces.
    Requires whole groups per row and rows of q and x contiguous; `fetch` prefetches as _dot4_q8."""
    lanes = min(group, 16)

    @intrinsic
    def dot4(typingctx, q, s, i, x, b, fetch):
        sig = nbtypes.UniTuple(nbtypes.float32, 4)(q, s, i, x, b, fetch)

        def unreachable(context, builder, signature, args):  # float weights never take this path
            zero = context.get_constant(nbtypes.float32, 0.0)
            return context.make_tuple(builder, signature.return_type, [zero] * 4)

        def codegen(context, builder, signature, args):
            qa = context.make_array(signature.args[0])(context, builder, args[0])
            sa = context.make_array(signature.args[1])(context, builder, args[1])
            xa = context.make_array(signature.args[3])(context, builder, args[3])
            intp = context.get_value_type(nbtypes.intp)
            row = context.cast(builder, args[2], signature.args[2], nbtypes.intp)
            b = context.cast(builder, args[4], signature.args[4], nbtypes.intp)
            fetch = context.cast(builder, args[5], signature.args[5], nbtypes.boolean)
            n = cgutils.unpack_tuple(builder, qa.shape, 2)[1]
            q_stride = cgutils.unpack_tuple(builder, qa.strides, 2)[0]
            x_stride = cgutils.unpack_tuple(builder, xa.strides, 2)[0]
            groups = builder.sdiv(n, ir.Constant(intp, group))
            i8, f32, i32 = ir.IntType(8), ir.FloatType(), ir.IntType(32)
            bytes_of = ir.VectorType(i8, group)
            floats_of = ir.VectorType(f32, group)
            acc_type = ir.VectorType(f32, lanes)
            flags = ("reassoc", "contract", "nsz")
            xrow = builder.gep(builder.bitcast(xa.data, i8.as_pointer()), [builder.mul(b, x_stride)])
            qbase = builder.bitcast(qa.data, i8.as_pointer())
            rows, scales, accs = [], [], []
            for r in range(4):
                ri = builder.add(row, ir.Constant(intp, r))
                rows.append(builder.gep(qbase, [builder.mul(ri, q_stride)]))
                scales.append(builder.gep(sa.data, [builder.mul(ri, groups)]))
                accs.append(cgutils.alloca_once_value(builder, ir.Constant(acc_type, None)))
            with cgutils.for_range(builder, groups) as loop:
                start = builder.mul(loop.index, ir.Constant(intp, group))
                xp = builder.gep(xrow, [builder.mul(start, ir.Constant(intp, 4))])
                xv = builder.load(builder.bitcast(xp, floats_of.as_pointer()), align=4)
                with builder.if_then(fetch):
                    ahead = builder.add(start, ir.Constant(intp, PREFETCH_AHEAD))
                    for r in range(4):
                        _emit_prefetch(builder, builder.gep(rows[r], [ahead]))
                for r in range(4):
                    wp = builder.bitcast(builder.gep(rows[r], [start]), bytes_of.as_pointer())
                    prod = builder.fmul(builder.sitofp(builder.load(wp, align=1), floats_of), xv, flags=flags)
                    prod = _emit_fold(builder, prod, group, lanes, flags)  # the group's products in 16 lanes
                    scale = builder.load(builder.gep(scales[r], [loop.index]))
                    splat = builder.insert_element(ir.Constant(acc_type, None), scale, ir.Constant(i32, 0))
                    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
                    acc = builder.fadd(builder.load(accs[r]), builder.fmul(prod, splat, flags=flags), flags=flags)
                    builder.store(acc, accs[r])
            sums = [builder.extract_element(_emit_fold(builder, builder.load(acc), lanes, 1, flags),
                                            ir.Constant(i32, 0)) for acc in accs]
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, (codegen if q.dtype == nbtypes.int8 else unreachable)

    return dot4


_dot4_q8_32 = _vector_dot4_q8(32)
_dot4_q8_64 = _vector_dot4_q8(64)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _dot4_q8(q, s, gs, i, x, b, fetch):  # rows i..i+3 of Q8_0 (whole groups per row) . row b of x
    """Four rows at a time, group by group: each group's integer products are summed as floats, then
    scaled once. `gs` is a literal where the caller can make it one (fully unrolled groups: ~10%).
    With `fetch`, ask for the weights PREFETCH_AHEAD bytes on, once per 64-byte line of each row
    (a hint: past the matrix's end it fetches nothing useful but cannot fault)."""
    ng = q.shape[1] // gs
    q0, q1, q2, q3, xrow = q[i], q[i + 1], q[i + 2], q[i + 3], x[b]
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for g in range(ng):
        lo = g * gs
        if fetch and (lo & 63) < gs:
            ahead = lo + PREFETCH_AHEAD
            _prefetch(q0, ahead)
            _prefetch(q1, ahead)
            _prefetch(q2, ahead)
            _prefetch(q3, ahead)
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


# A weight matrix reaches the kernels below as (w, s, gs): float32 w [m, n] with gs == 0 (s unused),
# or Q8_0: int8 w [m, n] with scales s [ceil(m*n/gs)] over groups of gs along the flattened matrix.
NO_SCALES = np.zeros(0, np.float32)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _row(w, s, gs, i, x, b):  # row i of W . row b of x [B, n] -> float
    if gs == 0:
        return _dot_f32(w, i, x, b)
    return _dot_q8(w, s, gs, i, x, b)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _rows4(w, s, gs, i, x, b):  # rows i..i+3 of W (whole groups per row) . row b of x -> four floats
    if gs == 0:
        return _dot4_f32(w, i, x, b)
    fetch = b == 0  # later rows of x find the weights in cache
    contiguous = w.strides[1] == 1 and x.strides[1] == 4
    if gs == 32 and contiguous:
        return _dot4_q8_32(w, s, i, x, b, fetch)
    if gs == 64 and contiguous:
        return _dot4_q8_64(w, s, i, x, b, fetch)
    return _dot4_q8(w, s, gs, i, x, b, fetch)


@njit(cache=True, inline="always")
def _units(w, gs):  # -> (units, four): rows go four at a time when every block of four holds whole groups
    m, n = w.shape
    four = m % 4 == 0 and (gs == 0 or n % gs == 0)
    return (m // 4 if four else m), four


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _unit(w, s, gs, four, u, x, b, out, col, add):
    """Rows of unit u of W (rows 4u..4u+3 when `four`, else row u) . row b of x, stored at (or, with
    `add`, added to) out[b, col + row]."""
    if four:
        i = 4 * u
        a0, a1, a2, a3 = _rows4(w, s, gs, i, x, b)
        if add:
            a0, a1 = a0 + out[b, col + i], a1 + out[b, col + i + 1]
            a2, a3 = a2 + out[b, col + i + 2], a3 + out[b, col + i + 3]
        out[b, col + i], out[b, col + i + 1], out[b, col + i + 2], out[b, col + i + 3] = a0, a1, a2, a3
    else:
        a = _row(w, s, gs, u, x, b)
        out[b, col + u] = a + out[b, col + u] if add else a


def _matmul(x, w, s, gs, out):  # [B, n], W [m, n] -> out [B, m]
    """Four rows at a time where they hold whole groups (more loads in flight when the weights
    stream from memory: 10-50%), else row by row."""
    units, four = _units(w, gs)
    for u in prange(units):
        for b in range(x.shape[0]):
            _unit(w, s, gs, four, u, x, b, out, 0, False)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def _attend(q, kc, vc, r, h, slot, n, out):
    """Query head h of row r (q [N, H, hd]) over the first n cached positions of `slot` (kc/vc
    [slots, KVH, seq_len, hd]) -> out[r, h*hd:(h+1)*hd]. Scores go four keys at a time and the
    weighted sum of values builds in a local vector (3x faster than one key at a time into `out`)."""
    hd = q.shape[2]
    root = np.float32(math.sqrt(hd))
    qv, kv = q[r, h], h // (q.shape[1] // kc.shape[1])  # query head h reads kv head kv
    keys, vals = kc[slot, kv], vc[slot, kv]
    att = np.empty(n, np.float32)
    t = 0
    while t + 4 <= n:
        k0, k1, k2, k3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for d in range(hd):
            qd = qv[d]
            a0 += qd * k0[d]
            a1 += qd * k1[d]
            a2 += qd * k2[d]
            a3 += qd * k3[d]
        att[t], att[t + 1], att[t + 2], att[t + 3] = a0 / root, a1 / root, a2 / root, a3 / root
        t += 4
    for t in range(t, n):
        acc = np.float32(0.0)
        for d in range(hd):
            acc += qv[d] * keys[t, d]
        att[t] = acc / root
    mx = att.max()
    total = np.float32(0.0)
    for t in range(n):
        e = np.float32(math.exp(att[t] - mx))
        att[t] = e
        total += e
    inv = np.float32(1.0) / total
    o = np.zeros(hd, np.float32)
    for t in range(n):
        a = att[t] * inv
        for d in range(hd):
            o[d] += a * vals[t, d]
    out[r, h * hd:(h + 1) * hd] = o


def _attention_decode(q, kc, vc, slots, pos, out):
    """One new query per sequence over its cached keys/values (the new key already written).
    q [B, H, hd], kc/vc [slots, KVH, seq_len, hd], slots [B], pos [B] (position of the query)
    -> out [B, H*hd]."""
    B, H = q.shape[0], q.shape[1]
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        _attend(q, kc, vc, b, h, slots[b], pos[b] + 1, out)


def _layer(x, rms_att, rms_ffn, wq, sq, wk, sk, wv, sv, wo, so, w1, s1, w2, s2, w3, s3, gs,
           kc, vc, slots, pos, cos, sin, eps, n_heads, halves):
    """One transformer layer for a few rows, updating the residual stream x [N, D] in place; each
    weight is read once for all rows and no row's result depends on the others. Row r is the token
    at position pos[r] of the sequence in cache slot slots[r] (a prompt's rows in order). kc/vc
    [slots, KVH, seq_len, hd] are this layer's cache; cos/sin [N, hd/2] each row's rotation, over
    pairs (i, i + hd/2) when `halves` (Hugging Face's q/k layout), else (2i, 2i+1).
    Matrices are (w, s, gs) as above, all of one kind. Same arithmetic as the per-operation path."""
    N, D = x.shape
    KV, hd = wk.shape[0], D // n_heads
    h = rmsnorm(x, rms_att, eps)
    q, k, v = np.empty((N, D), np.float32), np.empty((N, KV), np.float32), np.empty((N, KV), np.float32)
    nq, four = _units(wq, gs)
    nk, _ = _units(wk, gs)
    for u in prange(nq + 2 * nk):  # the three projections in one parallel pass over their rows
        for b in range(N):
            if u < nq:
                _unit(wq, sq, gs, four, u, h, b, q, 0, False)
            elif u < nq + nk:
                _unit(wk, sk, gs, four, u - nq, h, b, k, 0, False)
            else:
                _unit(wv, sv, gs, four, u - nq - nk, h, b, v, 0, False)
    q3, k3, v3 = q.reshape((N, n_heads, hd)), k.reshape((N, KV // hd, hd)), v.reshape((N, KV // hd, hd))
    rope_(q3, cos, sin, halves)
    rope_(k3, cos, sin, halves)
    for r in range(N):  # every row's key and value go in before any row attends
        kc[slots[r], :, pos[r]] = k3[r]
        vc[slots[r], :, pos[r]] = v3[r]
    att = np.empty((N, D), np.float32)
    for rh in prange(N * n_heads):
        r = rh // n_heads
        _attend(q3, kc, vc, r, rh % n_heads, slots[r], pos[r] + 1, att)
    units, four = _units(wo, gs)
    for u in prange(units):
        for b in range(N):
            _unit(wo, so, gs, four, u, att, b, x, 0, True)
    h = rmsnorm(x, rms_ffn, eps)
    H = w1.shape[0]
    g = np.empty((N, H), np.float32)
    units, four = _units(w1, gs)
    for u in prange(units):  # g = silu(w1 h) * (w3 h), both matrices in one pass
        for b in range(N):
            if four:
                i = 4 * u
                a0, a1, a2, a3 = _rows4(w1, s1, gs, i, h, b)
                c0, c1, c2, c3 = _rows4(w3, s3, gs, i, h, b)
                g[b, i], g[b, i + 1] = _silu(a0) * c0, _silu(a1) * c1
                g[b, i + 2], g[b, i + 3] = _silu(a2) * c2, _silu(a3) * c3
            else:
                g[b, u] = _silu(_row(w1, s1, gs, u, h, b)) * _row(w3, s3, gs, u, h, b)
    units, four = _units(w2, gs)
    for u in prange(units):
        for b in range(N):
            _unit(w2, s2, gs, four, u, g, b, x, 0, True)


def _dequantize_rows(q, s, gs, rows, out):  # int8 [m, n], f32 [groups], int, int [R] -> out [R, n]
    """Rows of a Q8_0 matrix as float32, walked in segments that each lie in one group (a row may
    start or end inside a group), so the inner loop is a plain vectorized scale."""
    n = q.shape[1]
    for r in prange(len(rows)):
        base = rows[r] * n
        qrow, orow = q[rows[r]], out[r]
        j = 0
        while j < n:
            g = (base + j) // gs
            end = min(n, (g + 1) * gs - base)
            scale = s[g]
            qs, os = qrow[j:end], orow[j:end]
            for k in range(end - j):
                os[k] = np.float32(qs[k]) * scale
            j = end


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
def rope_(x, cos, sin, halves):  # [N, H, hd] in place, [N, hd/2], [N, hd/2], bool
    """Rotate each pair of every head of row n by row n's angle (kernels.rope, in place): pairs
    (2i, 2i+1), or (i, i + hd/2) with `halves`."""
    N, H, hd = x.shape
    half = hd // 2
    for n in range(N):
        for h in range(H):
            for i in range(half):
                a, b = (i, i + half) if halves else (2 * i, 2 * i + 1)
                x0, x1 = x[n, h, a], x[n, h, b]
                c, s = cos[n, i], sin[n, i]
                x[n, h, a] = x0 * c - x1 * s
                x[n, h, b] = x0 * s + x1 * c


matmul = _compile(_matmul)
attention_decode = _compile(_attention_decode)
layer = _compile(_layer)
dequantize_rows = _compile(_dequantize_rows)


apply_threads(threads())  # the setting made before numba loaded
