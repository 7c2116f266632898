"""Q4_1 (ggml type 3): 32 values as 4-bit codes with a float16 scale and minimum (ggml block_q4_1).

value = d * q + m; nibbles as in Q4_0 (low: values 0-15, high: 16-31). Quantizing (llama.cpp's
quantize_row_q4_1_ref): d = (max - min) / 15, q = min(15, trunc((x - min) * (1/d) + 0.5)), m = min.
"""

import numpy as np

from .base import Matrix as _Matrix, f32, ggml_type, nibbles
from .ggml_quants import affine, pack_nibbles, quantize_blocks

NAME = "q4_1"
DTYPE = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 20 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    q = nibbles(blocks["qs"]).astype(np.float32)
    return f32(blocks["d"])[..., None] * q + f32(blocks["m"])[..., None]


def _rule(x, out):  # x float32 [B, 32] -> out [B]
    d, m, q = affine(x, 16, clamp=True)
    out["d"], out["m"], out["qs"] = d, m, pack_nibbles(q)


def quantize(w):  # float32 [rows, cols] (cols a multiple of 32) -> blocks [rows, cols / 32]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
