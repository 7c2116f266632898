"""Pure numpy float32 kernels of the Llama 2 forward pass. Shapes are written beside each function.

They follow llama2.c's run.c arithmetic (RMSNorm with eps inside the root, interleaved-pair RoPE,
SiLU-gated FFN) but work on whole matrices: a prompt goes through as one [T, dim] block.
"""

import numpy as np

F32 = np.float32


def rmsnorm(x, weight, eps):  # [T, D], [D], float -> [T, D]
    ss = np.einsum("td,td->t", x, x) / F32(x.shape[-1]) + F32(eps)
    return weight * (x * (F32(1.0) / np.sqrt(ss, dtype=F32))[:, None])


def rope_tables(head_dim, seq_len, theta):  # -> cos, sin: [seq_len, head_dim // 2] float32
    """run.c: freq = 1/powf(theta, i/head_dim) for even i; angle = pos * freq in float32. The power
    and trigonometry are evaluated in float64 and rounded once, as a correctly rounded libm does."""
    i = np.arange(0, head_dim, 2, dtype=F32)
    freq = (1.0 / np.power(np.float64(F32(theta)), np.float64(i / F32(head_dim)))).astype(F32)
    angle = np.arange(seq_len, dtype=F32)[:, None] * freq[None, :]  # float32 product, as in C
    return np.cos(angle.astype(np.float64)).astype(F32), np.sin(angle.astype(np.float64)).astype(F32)


def rope(x, cos, sin):  # [T, H, hd], [T, hd/2], [T, hd/2] -> [T, H, hd]
    """Rotate each (even, odd) pair of every head by its position's angle."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def softmax(x, axis=-1):  # [..., n] -> [..., n], float32, stable for huge logits
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, v, start):  # [T, H, hd], [KVH, S, hd], [KVH, S, hd], int -> [T, H*hd]
    """Causal grouped-query attention of T new queries at positions start..start+T-1 over the S =
    start+T cached keys and values; query head h reads kv head h // (H // KVH)."""
    T, H, hd = q.shape
    KVH, S, _ = k.shape
    g = H // KVH
    qh = q.reshape(T, KVH, g, hd).transpose(1, 2, 0, 3)  # [KVH, g, T, hd]
    kh = k.transpose(0, 2, 1)[:, None]  # [KVH, 1, hd, S]
    vh = v[:, None]  # [KVH, 1, S, hd]
    scores = np.matmul(qh, kh) / np.sqrt(F32(hd))  # [KVH, g, T, S]
    if T > 1:
        # query t sees keys 0..start+t
        mask = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # [T, S]
        scores[..., mask] = -np.inf
    out = np.matmul(softmax(scores), vh)  # [KVH, g, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, H * hd)


def silu(x):  # [...] -> [...]
    return x * (F32(1.0) / (F32(1.0) + np.exp(-x)))
