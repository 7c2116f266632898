"""Q8_0 (ggml type 8), GGUF's blocks: 32 int8 values with one float16 scale (ggml block_q8_0).

value = d * q. The native kernel quantizes the activations to Q8_0 as well and multiplies in
integers, as llama.cpp does (so the block layout is the activations' one, weights.activations.Q8_0).
(llama2.c's version-2 int8 layout, fp32 scales over groups of the flattened matrix, is a different
type: int8_groups.) Quantizing (llama.cpp's quantize_row_q8_0_ref): d = amax / 127, q = roundf(x / d).
"""

import numpy as np

from .activations import Q8_0 as DTYPE
from .base import Matrix as _Matrix, f32, ggml_type
from .ggml_quants import inverse, quantize_blocks

NAME = "q8_0"
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def dequantize(blocks):  # [...] blocks -> float32 [..., 32]
    return f32(blocks["d"])[..., None] * blocks["qs"].astype(np.float32)


def _rule(x, out):  # x float32 [B, 32] -> out [B]
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    v = x * inverse(d)[:, None]
    out["qs"] = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf: half away from zero
    out["d"] = d


def quantize(w):  # float32 [rows, cols] (cols a multiple of 32) -> blocks [rows, cols / 32]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
