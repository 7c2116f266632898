"""F32 (ggml type 0): plain float32 matrices, the llama2.c layout. Used in place.

Up to NATIVE_ROWS rows of x (decode steps) go through the native f32 kernel, which computes every
row alone (the same bits whatever the batch); more rows are one BLAS call on the matrix itself.
"""

import numpy as np

from .base import Matrix as _Matrix, native_for

NAME = "f32"
GGML_TYPE = 0
BLOCK = 1
DTYPE = np.dtype("<f4")
NO_SCALES = np.zeros(0, np.float32)  # the scales argument of a float32 matrix in the numba kernels
NATIVE_ROWS = 8  # up to this many rows of x: the native kernel (model.SMALL_BATCH)


def dequantize(blocks):  # [...] float32 -> float32 [..., 1]
    return np.asarray(blocks, dtype=np.float32)[..., None]


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, BLOCK, DTYPE
    dequantize_blocks = staticmethod(dequantize)
    STORES_FLOATS = True

    def __init__(self, w):  # w: float32 [out, in]
        super().__init__(w)
        self.w = self.blocks
        self.jit_args = (self.w, NO_SCALES, 0)

    def dequantize(self):  # the stored array itself (read-only where it is a view of a file)
        return self.w

    def __call__(self, x):  # [N, in] -> [N, out]: native kernel for a few rows, else BLAS
        if len(x) <= NATIVE_ROWS and self.data is not None:
            nat = native_for(GGML_TYPE)
            if nat is not None:
                x = np.ascontiguousarray(x, dtype=np.float32)
                out = np.empty((len(x), self.shape[0]), np.float32)
                nat.matmul(GGML_TYPE, self.w, x, out)
                return out
        return np.asarray(x, dtype=np.float32) @ self.w.T

    def rows(self, ids):  # [R] -> [R, in]
        return np.asarray(self.w[np.asarray(ids, dtype=np.int64).reshape(-1)], dtype=np.float32)
