"""Q4_1 (ggml type 3): 32 values as 4-bit codes with a float16 scale and minimum (ggml block_q4_1).

value = d * q + m; nibbles as in Q4_0 (low: values 0-15, high: 16-31).
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32, nibbles

NAME = "q4_1"
GGML_TYPE = 3
BLOCK = 32
DTYPE = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 20 bytes


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = nibbles(blocks["qs"]).astype(np.float32)
    return f32(blocks["d"])[..., None] * q + f32(blocks["m"])[..., None]


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_0"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
