"""Q5_1 (ggml type 7): 32 values as 5-bit codes with a float16 scale and minimum (ggml block_q5_1).

value = d * q + m; the codes as Q5_0's. Quantizing (llama.cpp's quantize_row_q5_1_ref):
d = (max - min) / 31, q = trunc((x - min) * (1/d) + 0.5) (not clamped: values stay <= 31), m = min.
"""

import numpy as np

from .base import Matrix as _Matrix, f32, ggml_type, nibbles
from .ggml_quants import affine, pack_high_bits, pack_nibbles, quantize_blocks
from .q5_0 import high_bits

NAME = "q5_1"
DTYPE = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])  # 24 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = (nibbles(blocks["qs"]) | (high_bits(blocks["qh"]) << np.uint8(4))).astype(np.float32)
    return f32(blocks["d"])[..., None] * q + f32(blocks["m"])[..., None]


def _rule(x, out):  # x float32 [B, 32] -> out [B]
    d, m, q = affine(x, 32, clamp=False)
    out["d"], out["m"], out["qh"], out["qs"] = d, m, pack_high_bits(q), pack_nibbles(q)


def quantize(w):  # float32 [rows, cols] (cols a multiple of 32) -> blocks [rows, cols / 32]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
