"""Pure numpy float32 kernels of the Llama 2 forward pass. Shapes are written beside each function.

They follow llama2.c's run.c arithmetic (RMSNorm with eps inside the root, interleaved-pair RoPE,
SiLU-gated FFN) but work on whole matrices: a prompt goes through as one [T, dim] block. numpy only;
attention is native (llama2.native.attention: it reads the paged KV cache in its type), and the
native kernels compute the other steps too, row by row.
"""

import numpy as np

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
