"""Q5_0 (ggml type 6): 32 values as 5-bit codes with one float16 scale (ggml block_q5_0).

value = d * (q - 16); the low four bits as Q4_0's nibbles, bit j of the little-endian uint32 qh is
the fifth bit of value j.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32, nibbles

NAME = "q5_0"
GGML_TYPE = 6
BLOCK = 32
DTYPE = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])  # 22 bytes

BITS = np.arange(32, dtype=np.uint32)


def high_bits(qh):  # uint8 [..., 4] -> uint8 [..., 32]: bit j of the little-endian word, j = 0..31
    word = np.ascontiguousarray(qh).view("<u4")  # [..., 1]
    return ((word >> BITS) & np.uint32(1)).astype(np.uint8)


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = (nibbles(blocks["qs"]) | (high_bits(blocks["qh"]) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return f32(blocks["d"])[..., None] * q.astype(np.float32)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_0"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
