"""Q5_K (ggml type 13): Q4_K's super-block (same scales and minimums, same 4-bit codes) plus a fifth
bit per value (ggml block_q5_K), 5.5 bits per value: bit j of qh[k] is the fifth bit of value k of
sub-block j. value = d * sc[j] * q - dmin * m[j].
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix
from .q4_k import low_codes, sub_block_scales

NAME = "q5_k"
GGML_TYPE = 13
BLOCK = 256
DTYPE = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                  ("qs", "u1", 128)])  # 176 bytes

SUB = np.arange(8, dtype=np.uint8)[:, None]


def dequantize(blocks):  # [...] blocks -> float32 [..., 256]
    d, dm = sub_block_scales(blocks)
    high = (blocks["qh"][..., None, :] >> SUB) & np.uint8(1)  # [..., 8, 32]
    q = (low_codes(blocks["qs"]) | (high << np.uint8(4))).astype(np.float32)
    return (d * q - dm).reshape(*blocks.shape, BLOCK)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_k"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
