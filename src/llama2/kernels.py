"""What the forward pass takes from numpy: the RoPE tables (the model's angle for every position
and pair), built once per model for its description (llama2.plan). The pass itself is native
(native/layer.c); its numpy reference is the tests' (tests/forward_reference.py).
"""

import numpy as np

F32 = np.float32


def rope_tables(head_dim, seq_len, theta):  # -> cos, sin: [seq_len, head_dim // 2] float32
    """run.c: freq = 1/powf(theta, i/head_dim) for even i; angle = pos * freq in float32. The power
    and trigonometry are evaluated in float64 and rounded once, as a correctly rounded libm does."""
    i = np.arange(0, head_dim, 2, dtype=F32)
    freq = (1.0 / np.power(np.float64(F32(theta)), np.float64(i / F32(head_dim)))).astype(F32)
    angle = np.arange(seq_len, dtype=F32)[:, None] * freq[None, :]  # float32 product, as in C
    return np.cos(angle.astype(np.float64)).astype(F32), np.sin(angle.astype(np.float64)).astype(F32)
