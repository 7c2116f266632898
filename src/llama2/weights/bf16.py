"""BF16 (ggml type 30): bfloat16 matrices, stored as uint16 (GGUF BF16, llama2.c version-3 bf16, and
the Hugging Face folders people download). Used in place; widening is a 16-bit shift, exact.
Products as f16's: the native kernel for few rows, the native float gemm for prompts.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix

NAME = "bf16"
GGML_TYPE = 30
BLOCK = 1
DTYPE = np.dtype("<u2")  # the upper half of a float32


def dequantize(blocks):  # [...] uint16 -> float32 [..., 1] (exact)
    out = np.asarray(blocks, dtype="<u2").astype(np.uint32)
    out <<= 16
    return out.view(np.float32)[..., None]


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    STORES_FLOATS = True
    # Every product is native (no tiles + BLAS): prompts widen panels of rows and run gemm.c, which
    # gives each output the dot kernel's bits, so a row's product never depends on its batch.
    tile_rows = invariant_rows = ALL_ROWS
