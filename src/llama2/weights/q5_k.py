"""Q5_K (ggml type 13): Q4_K's super-block (same scales and minimums, same 4-bit codes) plus a fifth
bit per value (ggml block_q5_K), 5.5 bits per value: bit j of qh[k] is the fifth bit of value k of
sub-block j. value = d * sc[j] * q - dmin * m[j]. Quantizing: Q4_K's search with 5-bit codes
(llama.cpp's quantize_row_q5_K_ref).
"""

import numpy as np

from .base import Matrix as _Matrix, ggml_type
from .ggml_quants import pack_scales, quantize_blocks, scale_min_search
from .q4_k import low_codes, sub_block_scales

NAME = "q5_k"
DTYPE = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                  ("qs", "u1", 128)])  # 176 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record

SUB = np.arange(8, dtype=np.uint8)[:, None]


def dequantize(blocks):  # [...] blocks -> float32 [..., 256]
    d, dm = sub_block_scales(blocks)
    high = (blocks["qh"][..., None, :] >> SUB) & np.uint8(1)  # [..., 8, 32]
    q = (low_codes(blocks["qs"]) | (high << np.uint8(4))).astype(np.float32)
    return (d * q - dm).reshape(*blocks.shape, BLOCK)


def _rule(x, out):  # x float32 [B, 256] -> out [B]
    d, dmin, ls, lm, L = scale_min_search(x, 31, -0.5, 15)
    out["d"], out["dmin"], out["scales"] = d, dmin, pack_scales(ls, lm)
    L = L.reshape(-1, 8, 32)  # sub-block j's fifth bits go to bit j of qh[0..31]
    out["qh"] = ((L >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    low = (L & 0x0F).reshape(-1, 4, 2, 32)
    out["qs"] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)


def quantize(w):  # float32 [rows, cols] (cols a multiple of 256) -> blocks [rows, cols / 256]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
