"""Q4_0 (ggml type 2): 32 values as 4-bit codes with one float16 scale (ggml block_q4_0).

value = d * (q - 8); byte j holds value j in its low nibble and value j + 16 in its high nibble.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32, nibbles

NAME = "q4_0"
GGML_TYPE = 2
BLOCK = 32
DTYPE = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # 18 bytes


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = nibbles(blocks["qs"]).astype(np.int8) - np.int8(8)
    return f32(blocks["d"])[..., None] * q.astype(np.float32)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_0"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
