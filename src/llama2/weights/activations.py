"""The activation blocks the integer kernels multiply with (native/act.c; ggml block_q8_0 and
block_q8_K), and x rounded as those kernels round it: what the tile path (dequantized tiles + BLAS)
applies to x so that a row's product does not depend on which path its batch took.

Q8_0 is also GGUF's Q8_0 weight block (weights/q8_0.py takes its layout from here). Q8_K is not a
weight type: only the rounding below reads it.
"""

import numpy as np

from .. import native

Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 34 bytes: float16 scale, 32 int8
Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])  # 292 bytes

_QUANTIZE = {"q8_0": (native.quantize_q8_0, Q8_0), "q8_k": (native.quantize_q8_k, Q8_K)}


def rounded(kind, x):  # "q8_0" | "q8_k", float32 [N, in] -> float32 [N, in]: d * q of x's blocks
    quantize, dtype = _QUANTIZE[kind]
    blocks = quantize(x).view(dtype)
    return (blocks["d"].astype(np.float32)[..., None] * blocks["qs"].astype(np.float32)).reshape(x.shape)
