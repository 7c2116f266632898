"""Q4_K (ggml type 12): super-blocks of 256 values in 8 sub-blocks of 32 (ggml block_q4_K), 4.5 bits
per value. Each sub-block has a 6-bit scale and a 6-bit minimum, themselves scaled by the float16
d and dmin: value = d * sc[j] * q - dmin * m[j].

The 12 scale bytes pack the sixteen 6-bit numbers: bytes 0-3 hold sc[0..3] in their low 6 bits,
bytes 4-7 m[0..3]; sc[4..7] and m[4..7] are the low and high nibbles of bytes 8-11 plus the top two
bits of bytes 0-3 and 4-7. The 128 code bytes go in 4 runs of 32: run r holds sub-block 2r in its
low nibbles and 2r+1 in its high nibbles.

Quantizing (llama.cpp's quantize_row_q4_K_ref): each sub-block's scale and min come from a search
over candidate scales (weighted least squares with weights av(|x|) + |x|, keeping the candidate of
least weighted squared error: ggml_quants.scale_min_search), stored as 6-bit multiples of the
super-block's float16 d and dmin.
"""

import numpy as np

from .base import Matrix as _Matrix, f32, ggml_type, nibbles
from .ggml_quants import pack_scales, quantize_blocks, scale_min_search

NAME = "q4_k"
DTYPE = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])  # 144 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


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


def _rule(x, out):  # x float32 [B, 256] -> out [B]
    d, dmin, ls, lm, L = scale_min_search(x, 15, -1.0, 20)
    out["d"], out["dmin"], out["scales"] = d, dmin, pack_scales(ls, lm)
    L = L.reshape(-1, 4, 2, 32)  # 64-value groups: low nibbles the first 32, high the next 32
    out["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def quantize(w):  # float32 [rows, cols] (cols a multiple of 256) -> blocks [rows, cols / 256]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
