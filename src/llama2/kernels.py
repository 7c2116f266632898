"""Pure numpy float32 kernels of the Llama 2 forward pass. Shapes are written beside each function.

They follow llama2.c's run.c arithmetic (RMSNorm with eps inside the root, interleaved-pair RoPE,
SiLU-gated FFN) but work on whole matrices: a prompt goes through as one [T, dim] block. numpy and
BLAS only; the native decode kernels (llama2.native) compute the same things row by row.
"""

import numpy as np

F32 = np.float32

# Queries per block of the causal softmax: a block's scores stay in cache across its passes, and keys
# past the block's last query are never touched.
SOFTMAX_BLOCK = 64


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


def attention(q, k, v, start):  # [T, H, hd], [KVH, S, hd], [KVH, S, hd], int -> [T, H*hd]
    """Causal grouped-query attention of T new queries at positions start..start+T-1 over the S =
    start+T cached keys and values; query head h reads kv head h // (H // KVH). Both products are
    batched BLAS matmuls."""
    T, H, hd = q.shape
    KVH, S, _ = k.shape
    g = H // KVH
    qh = np.ascontiguousarray(q.reshape(T, KVH, g, hd).transpose(1, 2, 0, 3))  # [KVH, g, T, hd]
    scores = np.matmul(qh, k.transpose(0, 2, 1)[:, None])  # [KVH, g, T, S]
    causal_softmax(scores.reshape(KVH * g, T, S), start, np.sqrt(F32(hd)))
    out = np.matmul(scores, v[:, None])  # [KVH, g, T, hd]
    return out.transpose(2, 0, 1, 3).reshape(T, H * hd)


def causal_softmax(scores, start, root=F32(1.0)):  # [R, T, S] in place; query t sees keys 0..start+t
    """Scores divided by `root`, then probabilities over each query's causal window; later keys get
    probability 0. Queries go in blocks: a block's scores stay in cache across the passes, keys past
    its last query are never touched, and only the block's diagonal needs masking."""
    R, T, S = scores.shape
    for t0 in range(0, T, SOFTMAX_BLOCK):
        t1 = min(T, t0 + SOFTMAX_BLOCK)
        keys = min(S, start + t1)  # no query of this block sees past this key
        part = scores[:, t0:t1, :keys]  # [R, b, keys]
        part /= root
        diag = part[:, :, start + t0:]  # [R, b, b]: query t0+i sees the first i+1 of these keys
        np.copyto(diag, F32(-np.inf), where=np.triu(np.ones((t1 - t0, keys - start - t0), bool), 1))
        part -= part.max(axis=-1, keepdims=True)
        np.exp(part, out=part)
        part /= part.sum(axis=-1, keepdims=True)
        scores[:, t0:t1, keys:] = 0.0


def silu_mul(a, b):  # [N, H], [N, H] -> [N, H]: silu(a) * b, computed in place in `a`
    t = np.negative(a)
    np.exp(t, out=t)
    t += F32(1.0)
    np.divide(a, t, out=a)
    a *= b
    return a
