"""Quantize float32 matrices into ggml's block types, with llama.cpp's rules (bytes equal to its
quantizer's without an importance matrix), and pick each tensor's type for a file type (mix.py).

    quantize(w [rows, cols] float32, "q4_k") -> (ggml type id, uint8 [rows, row_bytes])
    tensor_type("q4_k_m", "blk.3.ffn_down.weight", 3, 32) -> "q6_k"

Families: legacy.py (32-value blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), kquants.py (256-value
super-blocks: Q4_K, Q5_K, Q6_K), mix.py (which type each tensor of a Q4_K_M/Q5_K_M/... file gets).
F32 and F16 are here too, so a caller can quantize whatever `tensor_type` answers.
"""

import numpy as np

from . import kquants, legacy
from .mix import FILE_TYPES, MIXES, tensor_type

__all__ = ["TYPES", "NAMES", "BY_ID", "MIXES", "FILE_TYPES", "quantize", "tensor_type", "block_size",
           "row_bytes", "SCRATCH_BYTES"]

# The most the quantizers hold beside their input and output: one chunk's float32 temporaries
# (legacy.CHUNK blocks, kquants.CHUNK super-blocks: about 30 x 1M floats), for memory.py.
SCRATCH_BYTES = 128 << 20

# name -> (ggml type id, values per block, bytes per block)
TYPES = {
    "f32": (0, 1, 4), "f16": (1, 1, 2),
    "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24),
    "q8_0": (8, 32, 34), "q4_k": (12, 256, 144), "q5_k": (13, 256, 176), "q6_k": (14, 256, 210),
}
BY_ID = {tid: name for name, (tid, _, _) in TYPES.items()}  # ggml type id -> name
NAMES = tuple(n for n in TYPES if n not in ("f32", "f16"))  # the quantized types `quantize` makes


def _family(name):
    return legacy if name in legacy.TYPES else kquants


def block_size(name) -> int:
    return TYPES[name][1]


def row_bytes(name, cols) -> int:
    _, block, size = TYPES[name]
    return cols // block * size


def quantize(w, name):
    """w float32 [rows, cols] -> (ggml type id, uint8 [rows, row_bytes]) in type `name` (a key of
    TYPES). cols must be a multiple of the type's block (32, or 256 for the k-quants).
    quantize(name, w) is accepted too (the weight-types package calls it that way)."""
    if isinstance(w, str):
        w, name = name, w
    if name not in TYPES:
        raise ValueError(f"unknown quantization type {name!r} (expected one of {', '.join(TYPES)})")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a matrix [rows, cols], got shape {w.shape}")
    tid, block, _ = TYPES[name]
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"{name} needs rows of a multiple of {block} values, got {cols}")
    if name == "f32":
        raw = np.ascontiguousarray(w, "<f4")
    elif name == "f16":
        raw = np.ascontiguousarray(w, "<f2")
    else:
        raw = _family(name).quantize_blocks(np.ravel(w), name)
    return tid, raw.view(np.uint8).reshape(rows, row_bytes(name, cols))
