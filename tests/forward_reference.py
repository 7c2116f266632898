"""The forward pass step by step in Python: the reference the native one-call pass (llama2.plan,
native/layer.c) is held to, bit for bit (tests/engine/test_forward.py), and the place to swap a step
for another implementation's (tests/engine/test_kquant_files.py: llama.cpp's float16 attention).

Each product is one row of `Matrix(x)` at a time (so every row's product is its own, whatever the
pass), RMSNorm numpy's (`rmsnorm` below), RoPE and the SiLU gate the native kernels (libm's expf),
keys and values stored by the cache's own `write`, attention `native.attention` (every row
with a decode row's arithmetic, over the config's sliding window where it sets one) unless another
is given. q and the attention output are n_heads * head_dim wide, which may differ from dim.
Reference: llama2.c run.c `forward`.
"""

import numpy as np

from llama2 import native

F32 = np.float32


def rmsnorm(x, weight, eps):  # [T, D], [D], float -> [T, D]
    ss = np.einsum("td,td->t", x, x) / F32(x.shape[-1]) + F32(eps)
    return weight * (x * (F32(1.0) / np.sqrt(ss, dtype=F32))[:, None])


def rope(x, cos, sin, style="interleaved"):  # [T, H, hd], [T, hd/2], [T, hd/2] -> [T, H, hd]
    """Rotate each pair of every head by its position's angle. Pair i is (2i, 2i+1) when the weights
    interleave them (llama2.c), (i, i + hd/2) when they keep halves (Hugging Face's rotate_half)."""
    half = x.shape[-1] // 2
    pair = (np.s_[..., 0::2], np.s_[..., 1::2]) if style == "interleaved" else \
        (np.s_[..., :half], np.s_[..., half:])
    x0, x1 = x[pair[0]], x[pair[1]]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[pair[0]] = x0 * c - x1 * s
    out[pair[1]] = x0 * s + x1 * c
    return out


def silu_mul(a, b):  # [N, H], [N, H] -> [N, H]: silu(a) * b, computed in place in `a`
    t = np.negative(a)
    np.exp(t, out=t)
    t += F32(1.0)
    np.divide(a, t, out=a)
    a *= b
    return a


def rows_alone(m, x):  # [N, in] -> [N, out]: each row's product computed alone
    return np.concatenate([m(x[i:i + 1]) for i in range(len(x))])


def forward_batch(model, segments, cache, all_logits=False, attention=None):
    """model.forward_batch(segments, cache, all_logits), step by step. `attention(kvtype, q, k_pool,
    v_pool, tables, starts, counts, out, window)` replaces native.attention."""
    attention = attention or native.attention
    c = model.config
    H, KVH, hd = c.n_heads, c.n_kv_heads, c.head_dim
    spans = [(slot, int(cache.pos[slot]), len(tokens)) for slot, tokens in segments]
    for slot, _, T in spans:
        cache.reserve(slot, T)
    tokens = np.concatenate([np.asarray(t, np.int64).reshape(-1) for _, t in segments])
    N = len(tokens)
    positions = np.concatenate([np.arange(st, st + T) for _, st, T in spans])
    where = cache.locate(spans)
    cos, sin = model.cos[positions], model.sin[positions]
    tables = cache.table_array([slot for slot, _, _ in spans])
    starts = np.array([st for _, st, _ in spans], np.int64)
    counts = np.array([T for _, _, T in spans], np.int64)
    x = model.embedding.rows(tokens)  # [N, D]
    for l, layer in enumerate(model.layers):
        h = rmsnorm(x, layer.rms_att, c.norm_eps)
        q = native.rope(rows_alone(layer.wq, h).reshape(N, H, hd), cos, sin, c.rope_style)
        k = native.rope(rows_alone(layer.wk, h).reshape(N, KVH, hd), cos, sin, c.rope_style)
        cache.write(l, where, k, rows_alone(layer.wv, h).reshape(N, KVH, hd))
        att = np.empty((N, c.q_dim), np.float32)  # [N, H * hd]
        attention(cache.type.ID, q, cache.pool.k[l], cache.pool.v[l], tables, starts, counts, att,
                  c.sliding_window or 0)
        x = x + rows_alone(layer.wo, att)
        h = rmsnorm(x, layer.rms_ffn, c.norm_eps)
        x = x + rows_alone(layer.w2, native.silu_mul(rows_alone(layer.w1, h), rows_alone(layer.w3, h)))
    for slot, st, T in spans:
        cache.pos[slot] = st + T
        if c.sliding_window:  # the blocks the next row no longer attends go back to the pool
            cache.forget_before(slot, st + T + 1 - c.sliding_window)
    if not all_logits:
        x = x[np.cumsum(counts) - 1]
    return rows_alone(model.classifier, rmsnorm(x, model.rms_final, c.norm_eps))
