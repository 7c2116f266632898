"""Q4_0 (ggml type 2): 32 values as 4-bit codes with one float16 scale (ggml block_q4_0).

value = d * (q - 8); byte j holds value j in its low nibble and value j + 16 in its high nibble.
Quantizing (llama.cpp's quantize_row_q4_0_ref): d = max / -8 (max: the value of largest magnitude,
sign kept, the first on ties), q = min(15, trunc(x * (1/d) + 8.5)).
"""

import numpy as np

from .base import Matrix as _Matrix, f32, ggml_type, nibbles
from .ggml_quants import pack_nibbles, quantize_blocks, symmetric

NAME = "q4_0"
DTYPE = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # 18 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = nibbles(blocks["qs"]).astype(np.int8) - np.int8(8)
    return f32(blocks["d"])[..., None] * q.astype(np.float32)


def _rule(x, out):  # x float32 [B, 32] -> out [B]
    d, q = symmetric(x, 16)
    out["d"], out["qs"] = d, pack_nibbles(q)


def quantize(w):  # float32 [rows, cols] (cols a multiple of 32) -> blocks [rows, cols / 32]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
