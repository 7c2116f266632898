"""Q5_1 (ggml type 7): 32 values as 5-bit codes with a float16 scale and minimum (ggml block_q5_1).

value = d * q + m; the codes as Q5_0's.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32, nibbles
from .q5_0 import high_bits

NAME = "q5_1"
GGML_TYPE = 7
BLOCK = 32
DTYPE = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])  # 24 bytes


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = (nibbles(blocks["qs"]) | (high_bits(blocks["qh"]) << np.uint8(4))).astype(np.float32)
    return f32(blocks["d"])[..., None] * q + f32(blocks["m"])[..., None]


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_0"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
