"""What every weight type shares: a Matrix [out, in] over the stored blocks of one type, used in place.

A type module gives its block layout (one numpy dtype), its numpy dequantization (the reference,
bit-equal to the `gguf` package's), its quantization (llama.cpp's reference rule) and a Matrix
subclass naming them. A ggml type's id, values per block and activation kind are the extension's
record of it (native/blocks.h WEIGHT_TYPES, read by `ggml_type`). Products and row lookups go
through the native kernels (`llama2.native`: matmul, dequantize_rows).
"""

import numpy as np

from .. import native
from ..errors import FormatError
from .activations import rounded

# A product with at least a type's `tile_rows` rows of x dequantizes the matrix into float32 tiles of
# at most this many values (16 MiB) and lets BLAS multiply each tile (its columns of the product
# written in place); below `tile_rows` the native kernel reads the stored blocks directly. Every
# ggml type's native kernels beat dequantization + BLAS at every N (tile_rows = ALL_ROWS); only
# int8_groups's any-layout kernel, or a matrix that is not contiguous, reaches the tiles.
DEQUANT_TILE = 1 << 22
ALL_ROWS = 1 << 62  # a row count no product reaches: "every N"


def ggml_type(name, dtype):
    """(ggml id, values per block, activations) of weight type `name`, from the extension's record
    (native/blocks.h WEIGHT_TYPES); `dtype`, the module's block layout, must hold its bytes."""
    t = native.WEIGHT_TYPES[name]
    if dtype.itemsize != t.block_bytes:
        raise ImportError(f"weights.{name}: a block is {dtype.itemsize} bytes here, {t.block_bytes} in "
                          f"native/blocks.h")
    return t.id, t.block_values, t.activations


def nibbles(qs):  # uint8 [..., n] -> uint8 [..., 2n]: the n low nibbles, then the n high nibbles
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def f32(a):  # float16 scales (or any float) -> float32, as ggml's GGML_FP16_TO_FP32 (exact)
    return np.asarray(a).astype(np.float32)


class Matrix:
    """A weight matrix [out, in] of one stored type, a view of its file where the loader could map it.

    Subclasses set NAME, GGML_TYPE (None when GGUF has no such type), BLOCK (values per block),
    DTYPE (one block), ACTIVATIONS and `dequantize_blocks` (blocks [...] -> float32 [..., BLOCK]).
    The stored array is
    `blocks` [out, in / BLOCK] of DTYPE; `data` is the same memory as uint8 [out, row_bytes], as the
    native kernels take it.
    """
    NAME = GGML_TYPE = BLOCK = DTYPE = None
    tile_rows = ALL_ROWS  # from this many rows of x on: dequantized tiles + BLAS (see DEQUANT_TILE)
    # The largest N for which the product of N rows gives every row exactly the bits it gets alone:
    # the native kernel computes each row by itself (the same operations whatever N, the tile, the
    # thread count or the chunking), BLAS does not; so tile_rows - 1, or ALL_ROWS for the types
    # whose products never leave the native kernel. Transformer's is the minimum over its matrices;
    # the server batches prompts up to it without changing any bytes.
    invariant_rows = ALL_ROWS
    ACTIVATIONS = None  # "q8_0" or "q8_k": how the native kernel quantizes x (integer dot products)
    STORES_FLOATS = False  # float values (f32, f16, bf16): what `--quantize` at load applies to

    def __init__(self, blocks):
        blocks = np.asarray(blocks)
        if blocks.dtype != self.DTYPE or blocks.ndim != 2:
            raise TypeError(f"{self.NAME} matrix needs blocks [out, in/{self.BLOCK}] of {self.DTYPE}, "
                            f"got {blocks.dtype} {blocks.shape}")
        self.blocks = blocks
        self.shape = (blocks.shape[0], blocks.shape[1] * self.BLOCK)
        self.data = blocks.view(np.uint8).reshape(blocks.shape[0], -1) if blocks.flags.c_contiguous \
            else None

    @classmethod
    def from_buffer(cls, buf, offset, shape, what="tensor"):
        """The matrix `shape` [out, in] stored at byte `offset` of `buf`, as a view (no copy)."""
        rows, cols = shape
        if cols % cls.BLOCK:
            raise FormatError(f"{what}: {cls.NAME} rows of {cols} values are not whole blocks of "
                              f"{cls.BLOCK}")
        count = rows * (cols // cls.BLOCK)
        if offset + count * cls.DTYPE.itemsize > len(buf):
            raise FormatError(f"{what}: {cls.NAME} data at byte {offset} runs past the end of the file")
        return cls(np.frombuffer(buf, cls.DTYPE, count, offset).reshape(rows, cols // cls.BLOCK))

    @property
    def native_type(self) -> int:
        """The id the native kernels know `data` by: the ggml type, or a layout's (weights.interleaved)."""
        return self.GGML_TYPE

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @classmethod
    def stored_bytes(cls, rows: int, cols: int) -> int:
        """`nbytes` of a [rows, cols] matrix of this type, before there is one (memory.py's estimate)."""
        return rows * (cols // cls.BLOCK) * cls.DTYPE.itemsize

    @property
    def storage(self) -> np.ndarray:  # the stored array(s) as loaded, for checks that it is a view
        return self.blocks

    @staticmethod
    def dequantize_blocks(blocks):  # [...] of DTYPE -> float32 [..., BLOCK]
        raise NotImplementedError

    def dequantize(self) -> np.ndarray:  # -> float32 [out, in] (export, tests, quantizing at load)
        out = np.empty(self.shape, np.float32)
        self.dequantize_rows(0, self.shape[0], out)
        return out

    def __call__(self, x):  # [N, in] -> [N, out]
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) < self.tile_rows and self.data is not None:
            out = np.empty((len(x), self.shape[0]), np.float32)
            native.matmul(self.native_type, self.data, x, out)
            return out
        return self._tiled(x)

    def native_product(self):
        """How the native forward pass (llama2.plan) multiplies by this matrix: a spec
        native.forward_plan takes, whose kernels give each row the bits `self(x)` gives it alone."""
        data = self.data if self.data is not None else \
            np.ascontiguousarray(self.blocks).view(np.uint8).reshape(self.shape[0], -1)
        return ("type", self.native_type, data)

    def rows(self, ids):  # [R] -> float32 [R, in] (embedding lookups)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.shape[1]), np.float32)
        if self.data is not None:
            native.dequantize_rows(self.native_type, self.data, ids, out)
        else:
            out[:] = self.dequantize_blocks(self.blocks[ids]).reshape(len(ids), -1)
        return out

    def dequantize_rows(self, r0, r1, out):  # rows r0..r1-1 -> out [r1 - r0, in] float32
        if self.data is not None:
            native.dequantize_rows(self.native_type, self.data, np.arange(r0, r1, dtype=np.int64), out)
        else:
            out[:] = self.dequantize_blocks(self.blocks[r0:r1]).reshape(r1 - r0, -1)

    def _activations(self, x):  # [N, in] -> [N, in]: x as the native kernel sees it
        """With integer kernels, x rounded to their activation blocks (and back to float32), so a
        row's product does not depend on which path its batch's size chose: the server's rows give
        the same tokens alone or batched. For the float types, x itself (both paths are float)."""
        return x if self.ACTIVATIONS is None else rounded(self.ACTIVATIONS, x)

    def _tiled(self, x):  # [N, in] -> [N, out]: float32 tiles of the matrix, each multiplied by BLAS
        x = self._activations(x)
        m, n = self.shape
        step = max(4, DEQUANT_TILE // n)
        tile = np.empty((min(step, m), n), np.float32)
        out = np.empty((len(x), m), np.float32)
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            self.dequantize_rows(r0, r1, tile[:r1 - r0])
            np.matmul(x, tile[:r1 - r0].T, out=out[:, r0:r1])  # BLAS writes the column block in place
        return out

    def __repr__(self):
        return f"<{self.NAME} matrix {self.shape[0]}x{self.shape[1]}, {self.nbytes} bytes>"
