"""F16 (ggml type 1): IEEE half-precision matrices (GGUF F16, llama2.c version-3 fp16, HF float16).

Used in place. Few rows: the native kernel's float dot products over the half-precision values;
prompts: the native float gemm (native/gemm.c: panels of rows widened to float32, exact), with the
same bits per row as the few-rows kernel.
"""

import numpy as np

from .base import ALL_ROWS, Matrix as _Matrix

NAME = "f16"
GGML_TYPE = 1
BLOCK = 1
DTYPE = np.dtype("<f2")


def dequantize(blocks):  # [...] float16 -> float32 [..., 1] (exact)
    return np.asarray(blocks).astype(np.float32)[..., None]


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    STORES_FLOATS = True
    # Every product is native (no tiles + BLAS): prompts widen panels of rows and run gemm.c, which
    # gives each output the dot kernel's bits, so a row's product never depends on its batch.
    tile_rows = invariant_rows = ALL_ROWS
