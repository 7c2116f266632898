"""Layouts made at load: a weight type's rows interleaved in groups, for the product kernels.

A layout (native/blocks.h WEIGHT_TYPES, group > 1; `native.LAYOUTS`) holds a base type's blocks
with each group of `group` rows stored dword by dword: dword k of block b of row r of a group at
byte 4 * ((b * dwords_per_block + k) * group + r) of the group. The prompt and multi-row kernels
then read a group's rows as one vector per dword as they lie, where the file's row order makes them
transpose every block of 16 rows first (kq_gemm.h), and decode reads the same bytes. Every output
has the base type's bits, at every level: a layout changes how the bytes lie, never a result.

`interleaved(m)` is what the model does at load (llama2.model.Transformer): the matrix's rows in its
type's layout, in memory of their own (anonymous pages), and
the mapped file's pages of the old rows handed back (`madvise(MADV_DONTNEED)`), so the process holds
the matrix once, as llama.cpp's repacking at load does. A matrix with no layout for its type, whose
rows are not whole groups, or that is not contiguous stays as it is, and so does every matrix where
the active kernels for its type are not ones the layout speeds up (`GAINS_ON`: the AVX-512 variants).
The layout's kernels run at every level all the same (a level chosen after the load reads it).
"""

import mmap

import numpy as np

from .. import native
from .base import Matrix as _Matrix

LAYOUTS = {lay.base: lay for lay in native.LAYOUTS.values()}  # base type name -> native.Layout
# The variants whose kernels gain from a layout: the 16-lane ones. At AVX2 (8 lanes, two passes over
# each group, the codes split again for every 4 activation rows) the layout lost on Zen 4: TinyLlama
# Q4_K_M decode 0.76x and prompts 0.90x the file's order, 4 and 8 rows 1.40x and 1.20x (both in one
# process, LLAMA2_ISA=avx2); at AVX-512 it gained everywhere (docs/benchmarks.md).
GAINS_ON = ("avx512", "avx512vnni")


class Matrix(_Matrix):
    """A matrix [out, in] of a base type (NAME, GGML_TYPE: the base's) whose `data` lies in one of the
    type's layouts (`layout`): the same blocks' bytes, regrouped. Products and row lookups run on the
    layout's native kernels (`native_type`); `file_order()` gives the bytes as a file stores them."""

    def __init__(self, layout, base, data):
        self.layout = layout
        self.NAME, self.GGML_TYPE, self.BLOCK, self.DTYPE, self.ACTIVATIONS = (
            base.NAME, base.GGML_TYPE, base.BLOCK, base.DTYPE, base.ACTIVATIONS)
        super().__init__(data.view(base.DTYPE).reshape(data.shape[0], -1))

    @property
    def native_type(self) -> int:
        return self.layout.id

    @staticmethod
    def dequantize_blocks(blocks):  # `data` is always whole and contiguous: the native paths run
        raise TypeError("a layout's blocks are not in row order: read them through its native kernels")

    def file_order(self) -> np.ndarray:
        """uint8 [out, row_bytes]: the rows as the base type stores them (the layout undone)."""
        rows, rb = self.data.shape
        g, dw = self.layout.group, self.DTYPE.itemsize // 4
        d = self.data.view("<u4").reshape(rows // g, rb // self.DTYPE.itemsize, dw, g)
        return np.ascontiguousarray(d.transpose(0, 3, 1, 2)).view(np.uint8).reshape(rows, rb)

    def __repr__(self):
        rows, cols = self.shape
        return f"<{self.NAME} matrix {rows}x{cols} in layout {self.layout.name}, {self.nbytes} bytes>"


def regrouped_tensor(tensor: str, shared_classifier: bool) -> bool:
    """Whether the model regroups its tensor `tensor` (our name) at all: the embedding's lookups read
    a few rows of the file, so it is regrouped only where it is also the classifier."""
    return tensor != "token_embedding" or shared_classifier


def regroups(name: str, rows: int) -> bool:
    """Whether `interleaved` regroups a matrix of weight type `name` (ours: "q4_k") with `rows` rows,
    with the kernels now active (memory.py budgets the copy's address space by it)."""
    lay = LAYOUTS.get(name)
    if lay is None or rows % lay.group:
        return False
    k, kind = native.kernels(), lay.base.upper()
    return k.types.get(kind, k.base) in GAINS_ON and k.decode.get(kind, k.base) in GAINS_ON


def interleaved(m):
    """`m` in its type's layout (see the module's text), or `m` itself where it has none."""
    from . import module  # the weights package, loaded by then
    if m.data is None or not regroups(m.NAME, m.shape[0]):
        return m
    lay = LAYOUTS[m.NAME]
    out = _anonymous(m.data.shape)
    native.interleave(lay.id, m.data, out)
    _hand_back(m.data)
    return Matrix(lay, module(lay.base), out)


def _anonymous(shape):
    """A writable uint8 array of `shape` on pages of its own (page-aligned, so every 64-byte load
    of the kernels is aligned). Not advised MADV_HUGEPAGE: on the machine of docs/benchmarks.md huge
    pages made the Llama 2 7B shape's load 2.5 s slower (compaction) and its decode no faster (7.1 tok/s
    either way, two copies of the model alternated in one process)."""
    size = int(np.prod(shape))
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, np.uint8, size).reshape(shape)


def _hand_back(a):
    """The whole pages under array `a`, when it is a view of a memory-mapped file: dropped from the
    process (madvise DONTNEED: read again from the file if anything touches them later)."""
    mapped = a
    while mapped is not None and not isinstance(mapped, mmap.mmap):
        mapped = getattr(mapped, "base", getattr(mapped, "obj", None))
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = a.__array_interface__["data"][0] - np.frombuffer(mapped, np.uint8, 1).__array_interface__["data"][0]
    page = mmap.PAGESIZE
    first, end = -(-start // page) * page, (start + a.nbytes) // page * page
    if end > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, end - first)
