"""int8_groups: llama2.c's int8 layout (version 2: export.py version2_export, runq.c), which our
version-3 files and `--quantize` call q8_0 (GGUF's Q8_0 blocks are weights/q8_0.py): int8 values
[out, in] with one float32 scale per group of `group_size` consecutive values of the flattened
matrix (any group size; a row may straddle two groups, the last group may be short).
value = s[g] * q. Not a GGUF type: the values and the scales are two arrays, not interleaved blocks.

Products and lookups run on the native kernels. Where every row holds whole groups and the group
size is a multiple of 32 (what export writes by default: 64), `native.matmul_int8_rows` quantizes the
activations to Q8_0 blocks and multiplies in integers, as for GGUF Q8_0; any other layout (e.g.
stories260K-q8.bin: groups of 8, rows of 172 straddling them) runs on `native.matmul_int8_flat`, float
activations summed group segment by segment. Row lookups are `native.dequantize_int8`, bit-equal
to `dequantize` below. The kernels are named for the layout they take: int8_rows (every row holds
whole groups of a multiple of 32 values: integer products) and int8_flat (groups over the flattened
matrix, any layout: float activations).
"""

import numpy as np

from .. import native
from .activations import rounded
from .base import ALL_ROWS, Matrix as _Matrix

NAME = "int8_groups"
GGML_TYPE = None
VALUES = np.dtype("i1")  # [out, in]
SCALES = np.dtype("<f4")  # [ceil(out * in / group_size)]
SMALL_BATCH = 8  # up to this many rows (any layout): the native product reads the int8 values directly


def n_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def dequantize(q, s, group_size, start=0):  # int8 [R, n] (flat index `start` on), f32 [groups] -> f32 [R, n]
    """The reference: each value times the scale of the group its flat index falls in."""
    flat = np.arange(q.size, dtype=np.int64) + start
    return (q.reshape(-1).astype(np.float32) * s[flat // group_size]).reshape(q.shape)


def quantize(w: np.ndarray, group_size: int, chunk_values: int = 1 << 20) -> "Matrix":
    """Symmetric int8 over groups of the flattened tensor, tail group included (llama2.c export.py's
    rule: scale = max|w| / 127, q = round(w / scale), half to even). Works through `chunk_values`
    values at a time so temporaries stay small for big tensors."""
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    ng = n_groups(flat.size, group_size)
    q = np.empty(ng * group_size, np.int8)
    scale = np.empty(ng, np.float32)
    step = max(1, chunk_values // group_size)  # groups per chunk
    for g0 in range(0, ng, step):
        g1 = min(ng, g0 + step)
        chunk = flat[g0 * group_size: g1 * group_size]
        if chunk.size < (g1 - g0) * group_size:  # the short tail group, padded with zeros
            chunk = np.concatenate([chunk, np.zeros((g1 - g0) * group_size - chunk.size, np.float32)])
        groups = chunk.reshape(g1 - g0, group_size)
        s = (np.abs(groups).max(axis=1) / np.float32(127.0)).astype(np.float32)
        safe = np.where(s > 0, s, np.float32(1.0))
        q[g0 * group_size: g1 * group_size] = np.round(groups / safe[:, None]).astype(np.int8).reshape(-1)
        scale[g0:g1] = s
    return Matrix(q[: flat.size].reshape(w.shape), scale, group_size)


class Matrix(_Matrix):
    """int8 values q [out, in] and float32 group scales s, both views of the file where loaded."""
    NAME, GGML_TYPE, BLOCK, DTYPE = NAME, GGML_TYPE, 1, VALUES

    def __init__(self, q, s, group_size: int):
        self.q, self.s, self.group_size = q, s, int(group_size)
        self.shape = q.shape
        self.blocks, self.data = q, None
        if s.shape != (n_groups(q.size, self.group_size),):
            raise ValueError(f"int8_groups: {q.shape} values in groups of {group_size} need "
                             f"{n_groups(q.size, self.group_size)} scales, got {s.shape}")
        cols = q.shape[1] if q.ndim == 2 else 0
        # Whole groups per row, a multiple of 32 values: integer products on Q8_0 activations (the
        # native split kernel) at every N. Any other layout: the native float product up to
        # SMALL_BATCH rows, then tiles + BLAS.
        self.split = self.group_size % 32 == 0 and cols % self.group_size == 0
        if self.split:
            self.tile_rows = self.invariant_rows = ALL_ROWS
        else:
            self.tile_rows, self.invariant_rows = SMALL_BATCH + 1, SMALL_BATCH

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.s.nbytes

    @classmethod
    def stored_bytes(cls, rows: int, cols: int, group_size: int) -> int:
        return rows * cols * VALUES.itemsize + n_groups(rows * cols, group_size) * SCALES.itemsize

    @property
    def storage(self):
        return self.q, self.s

    def dequantize(self) -> np.ndarray:  # -> float32 [out, in]
        return dequantize(self.q, self.s, self.group_size)

    def __call__(self, x):  # [N, in] -> [N, out]
        """Below `tile_rows` rows (every N for the split layout): native integer products for the
        split layout, the native float product for any other; from there on dequantized tiles +
        BLAS."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) >= self.tile_rows:
            return self._tiled(x)
        out = np.empty((len(x), self.shape[0]), np.float32)
        if self.split:
            native.matmul_int8_rows(self.q, self.s, self.group_size, x, out)
        else:
            native.matmul_int8_flat(self.q, self.s, self.group_size, x, out)
        return out

    def native_product(self):  # the kernels __call__ runs below tile_rows, at any number of rows
        return ("int8_rows" if self.split else "int8_flat", np.ascontiguousarray(self.q),
                np.ascontiguousarray(self.s), self.group_size)

    def rows(self, ids):  # [R] -> [R, in]
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.shape[1]), np.float32)
        native.dequantize_int8(self.q, self.s, self.group_size, ids, out)
        return out

    def _activations(self, x):  # [N, in] -> [N, in]: x rounded as the native product rounds it
        return rounded("q8_0", x) if self.split else x

    def dequantize_rows(self, r0, r1, out):  # rows r0..r1-1 -> out [r1 - r0, in]
        native.dequantize_int8(self.q, self.s, self.group_size, np.arange(r0, r1, dtype=np.int64), out)
