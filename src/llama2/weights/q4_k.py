"""Q4_K (ggml type 12): super-blocks of 256 values in 8 sub-blocks of 32 (ggml block_q4_K), 4.5 bits
per value. Each sub-block has a 6-bit scale and a 6-bit minimum, themselves scaled by the float16
d and dmin: value = d * sc[j] * q - dmin * m[j].

The 12 scale bytes pack the sixteen 6-bit numbers: bytes 0-3 hold sc[0..3] in their low 6 bits,
bytes 4-7 m[0..3]; sc[4..7] and m[4..7] are the low and high nibbles of bytes 8-11 plus the top two
bits of bytes 0-3 and 4-7. The 128 code bytes go in 4 runs of 32: run r holds sub-block 2r in its
low nibbles and 2r+1 in its high nibbles.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix, f32, nibbles

NAME = "q4_k"
GGML_TYPE = 12
BLOCK = 256
DTYPE = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])  # 144 bytes


def scales_mins(scales):  # uint8 [..., 12] -> sc, m: uint8 [..., 8] each
    a, b, c = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([a & np.uint8(63), (c & np.uint8(0x0F)) | ((a >> np.uint8(2)) & np.uint8(0x30))], -1)
    m = np.concatenate([b & np.uint8(63), (c >> np.uint8(4)) | ((b >> np.uint8(2)) & np.uint8(0x30))], -1)
    return sc, m


def sub_block_scales(blocks):  # -> d * sc, dmin * m: float32 [..., 8, 1] each
    sc, m = scales_mins(blocks["scales"])
    d = f32(blocks["d"])[..., None] * sc.astype(np.float32)
    dm = f32(blocks["dmin"])[..., None] * m.astype(np.float32)
    return d[..., None], dm[..., None]


def low_codes(qs):  # uint8 [..., 128] -> uint8 [..., 8, 32]: each sub-block's 4-bit codes
    return nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).reshape(*qs.shape[:-1], 8, 32)


def dequantize(blocks):  # [...] blocks -> float32 [..., 256]
    d, dm = sub_block_scales(blocks)
    q = low_codes(blocks["qs"]).astype(np.float32)
    return (d * q - dm).reshape(*blocks.shape, BLOCK)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    ACTIVATIONS = "q8_k"
    tile_rows = invariant_rows = ALL_ROWS  # every N on the native kernel (row by row)
