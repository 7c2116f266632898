"""Q6_K (ggml type 14): super-blocks of 256 values in 16 sub-blocks of 16 (ggml block_q6_K), 6.5625
bits per value: value = d * scales[j] * (q - 32), with int8 sub-block scales and a float16 d.

The codes: each half of the block (128 values) takes 64 bytes of ql and 32 of qh. ql's low nibbles
give values 0-63 of the half and its high nibbles 64-127; qh's bit pairs (0-1, 2-3, 4-5, 6-7) give
the top two bits of values 0-31, 32-63, 64-95, 96-127.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32, nibbles

NAME = "q6_k"
GGML_TYPE = 14
BLOCK = 256
DTYPE = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])  # 210 bytes

PAIRS = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]


def dequantize(blocks):  # [...] blocks -> float32 [..., 256]
    lead = blocks.shape
    low = nibbles(blocks["ql"].reshape(*lead, 2, 64))  # [..., 2, 128]
    high = (blocks["qh"].reshape(*lead, 2, 1, 32) >> PAIRS) & np.uint8(3)  # [..., 2, 4, 32]
    q = (low | (high.reshape(*lead, 2, 128) << np.uint8(4))).astype(np.int8) - np.int8(32)
    d = f32(blocks["d"])[..., None] * blocks["scales"].astype(np.float32)  # [..., 16]
    return (d[..., None] * q.reshape(*lead, 16, 16).astype(np.float32)).reshape(*lead, BLOCK)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_k"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
