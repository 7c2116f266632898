"""Q5_0 (ggml type 6): 32 values as 5-bit codes with one float16 scale (ggml block_q5_0).

value = d * (q - 16); the low four bits as Q4_0's nibbles, bit j of the little-endian uint32 qh is
the fifth bit of value j. Quantizing (llama.cpp's quantize_row_q5_0_ref): d = max / -16,
q = min(31, trunc(x * (1/d) + 16.5)).
"""

import numpy as np

from .base import Matrix as _Matrix, f32, ggml_type, nibbles
from .ggml_quants import pack_high_bits, pack_nibbles, quantize_blocks, symmetric

NAME = "q5_0"
DTYPE = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])  # 22 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record

BITS = np.arange(32, dtype=np.uint32)


def high_bits(qh):  # uint8 [..., 4] -> uint8 [..., 32]: bit j of the little-endian word, j = 0..31
    word = np.ascontiguousarray(qh).view("<u4")  # [..., 1]
    return ((word >> BITS) & np.uint32(1)).astype(np.uint8)


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = (nibbles(blocks["qs"]) | (high_bits(blocks["qh"]) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return f32(blocks["d"])[..., None] * q.astype(np.float32)


def _rule(x, out):  # x float32 [B, 32] -> out [B]
    d, q = symmetric(x, 32)
    out["d"], out["qh"], out["qs"] = d, pack_high_bits(q), pack_nibbles(q)


def quantize(w):  # float32 [rows, cols] (cols a multiple of 32) -> blocks [rows, cols / 32]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
