"""BF16 (ggml type 30): bfloat16 matrices, stored as uint16, the upper half of a float32 (GGUF BF16,
llama2.c version-3 bf16, and the Hugging Face folders people download). Used in place; widening is a
16-bit shift, exact. Products as f16's: the native kernel for few rows, the native float gemm for
prompts. The conversions both ways are here, for every format that stores bfloat16.
"""

import numpy as np

from .base import Matrix as _Matrix, ggml_type

NAME = "bf16"
DTYPE = np.dtype("<u2")  # the upper half of a float32
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:  # uint16 [...] -> float32 [...] (exact)
    out = np.asarray(u16, dtype="<u2").astype(np.uint32)
    out <<= 16  # in place: one float32-sized buffer, no temporaries
    return out.view(np.float32)


def f32_to_bf16(a: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:  # float32 [...] -> uint16 [...]
    """Round to nearest even (NaN stays NaN), `chunk` values at a time to keep temporaries small."""
    f = np.ascontiguousarray(a, dtype="<f4").reshape(-1)
    u = f.view(np.uint32)
    out = np.empty(u.size, "<u2")
    for i in range(0, u.size, chunk):
        x = u[i:i + chunk]
        out[i:i + chunk] = (x + (np.uint32(0x7FFF) + ((x >> 16) & np.uint32(1)))) >> 16
        nan = np.isnan(f[i:i + chunk])
        if nan.any():
            out[i:i + chunk][nan] = (x[nan] >> 16) | np.uint32(0x40)  # keep it a quiet NaN
    return out.reshape(np.shape(a))


def dequantize(blocks):  # [...] uint16 -> float32 [..., 1] (exact)
    return bf16_to_f32(blocks)[..., None]


def quantize(w):  # float32 [rows, cols] -> uint16 [rows, cols]
    return f32_to_bf16(w)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
    STORES_FLOATS = True
