"""F32 (ggml type 0): plain float32 matrices, the llama2.c layout. Used in place.

Every product runs native: up to a dot call's rows on the f32 kernel (decode: the arithmetic the
run.c goldens are printed with), more rows (prompts) on the native float gemm (native/gemm.c), which
gives each row exactly the f32 kernel's bits; so a row's logits never depend on its batch. For a
matrix that is not contiguous, one BLAS call.
"""

import numpy as np

from .. import native
from .base import Matrix as _Matrix, ggml_type

NAME = "f32"
DTYPE = np.dtype("<f4")
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record


def dequantize(blocks):  # [...] float32 -> float32 [..., 1]
    return np.asarray(blocks, dtype=np.float32)[..., None]


def quantize(w):  # float32 [rows, cols] -> the same, contiguous
    return np.ascontiguousarray(w, DTYPE)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
    STORES_FLOATS = True

    def __init__(self, w):  # w: float32 [out, in]
        super().__init__(w)
        self.w = self.blocks

    def dequantize(self):  # the stored array itself (read-only where it is a view of a file)
        return self.w

    def __call__(self, x):  # [N, in] -> [N, out]: native, else BLAS
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2 and self.w.flags.c_contiguous:
            out = np.empty((len(x), self.shape[0]), np.float32)
            native.matmul(GGML_TYPE, self.w, np.ascontiguousarray(x), out)
            return out
        return x @ self.w.T

    def native_product(self):
        if not self.w.flags.c_contiguous:
            return None
        return ("type", GGML_TYPE, self.w)

    def rows(self, ids):  # [R] -> [R, in]
        return np.asarray(self.w[np.asarray(ids, dtype=np.int64).reshape(-1)], dtype=np.float32)
