"""Compiled kernels (numba) for the few rows of a decode step, where numpy's per-call overhead and
single-row BLAS calls would dominate. Shapes are written beside each kernel.

Reductions may be reassociated (fastmath 'reassoc'/'contract': SIMD sums and fused multiply-adds),
as run.c compiled with -Ofast does; no approximate math functions are allowed. Every kernel is
parallel over output rows (or heads), so `set_threads` applies to all of them.
"""

import math
import os

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads

FASTMATH = {"reassoc", "contract", "nsz"}


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


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_f32(x, w, out):  # [B, n], [m, n] -> out [B, m]
    B, n = x.shape
    m = w.shape[0]
    for i in prange(m):
        for b in range(B):
            acc = np.float32(0.0)
            for j in range(n):
                acc += w[i, j] * x[b, j]
            out[b, i] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_q8(x, q, s, gs, out):  # [B, n], int8 [m, n], f32 [ceil(m*n/gs)], int -> out [B, m]
    """Q8_0 weights with groups over the flattened matrix (rows may straddle groups): each row is
    dequantized once into a float32 buffer, then dotted with every input row."""
    B, n = x.shape
    m = q.shape[0]
    for i in prange(m):
        row = np.empty(n, np.float32)
        j = 0
        base = i * n
        while j < n:
            g = (base + j) // gs
            end = min(n, (g + 1) * gs - base)
            scale = s[g]
            for k in range(j, end):
                row[k] = np.float32(q[i, k]) * scale
            j = end
        for b in range(B):
            acc = np.float32(0.0)
            for k in range(n):
                acc += row[k] * x[b, k]
            out[b, i] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matmul_q8_aligned(x, q, s, gs, out):  # [B, n], int8 [m, n], f32 [m*n/gs], int -> out [B, m]
    """Q8_0 when every row holds whole groups (n % gs == 0): per group, an integer-free float dot of
    the int8 values with x, scaled once per group."""
    B, n = x.shape
    m = q.shape[0]
    ng = n // gs
    for i in prange(m):
        for b in range(B):
            acc = np.float32(0.0)
            for g in range(ng):
                part = np.float32(0.0)
                o = g * gs
                for k in range(gs):
                    part += np.float32(q[i, o + k]) * x[b, o + k]
                acc += part * s[i * ng + g]
            out[b, i] = acc


@njit(cache=True)
def dequantize_rows(q, s, gs, rows, out):  # int8 [m, n], f32 [groups], int, int [R] -> out [R, n]
    n = q.shape[1]
    for r in range(len(rows)):
        base = rows[r] * n
        for k in range(n):
            out[r, k] = np.float32(q[rows[r], k]) * s[(base + k) // gs]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def attention_decode(q, kc, vc, slots, pos, out):
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
