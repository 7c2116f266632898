"""Q8_0 (ggml type 8), GGUF's blocks: 32 int8 values with one float16 scale (ggml block_q8_0).

value = d * q. The native kernel quantizes the activations to Q8_0 as well and multiplies in
integers, as llama.cpp does. (Our llama2.c version-2 int8 layout, fp32 scales over groups of the
flattened matrix, is a different type: q8_v2.)
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32

NAME = "q8_0"
GGML_TYPE = 8
BLOCK = 32
DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 34 bytes


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    return f32(blocks["d"])[..., None] * blocks["qs"].astype(np.float32)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_0"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
