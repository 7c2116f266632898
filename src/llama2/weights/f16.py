"""F16 (ggml type 1): IEEE half-precision matrices (GGUF F16, llama2.c version-3 fp16, HF float16).

Used in place. Few rows: the native kernel's float dot products over the half-precision values;
prompts: the native float gemm (native/gemm.c: panels of rows widened to float32, exact), with the
same bits per row as the few-rows kernel, so a row's product never depends on its batch.
Quantizing: round to nearest even (numpy's astype).
"""

import numpy as np

from .base import Matrix as _Matrix, ggml_type

NAME = "f16"
DTYPE = np.dtype("<f2")
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def dequantize(blocks):  # [...] float16 -> float32 [..., 1] (exact)
    return np.asarray(blocks).astype(np.float32)[..., None]


def quantize(w):  # float32 [rows, cols] -> float16 [rows, cols]
    return np.ascontiguousarray(w, DTYPE)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
    STORES_FLOATS = True
