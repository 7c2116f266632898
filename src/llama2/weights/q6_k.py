"""Q6_K (ggml type 14): super-blocks of 256 values in 16 sub-blocks of 16 (ggml block_q6_K), 6.5625
bits per value: value = d * scales[j] * (q - 32), with int8 sub-block scales and a float16 d.

The codes: each half of the block (128 values) takes 64 bytes of ql and 32 of qh. ql's low nibbles
give values 0-63 of the half and its high nibbles 64-127; qh's bit pairs (0-1, 2-3, 4-5, 6-7) give
the top two bits of values 0-31, 32-63, 64-95, 96-127.

Quantizing (llama.cpp's quantize_row_q6_K_ref): each sub-block's scale is the best of 19 candidates
by weighted (x^2) least squares (ggml_quants.symmetric_search), then stored as an int8 multiple of
the super-block's float16 d.
"""

import numpy as np

from .base import Matrix as _Matrix, f32, ggml_type, nibbles
from .ggml_quants import GROUP_MAX_EPS, nearest, quantize_blocks, symmetric_search

NAME = "q6_k"
DTYPE = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])  # 210 bytes
GGML_TYPE, BLOCK, ACTIVATIONS = ggml_type(NAME, DTYPE)  # native/blocks.h's record

PAIRS = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]


def dequantize(blocks):  # [...] blocks -> float32 [..., 256]
    lead = blocks.shape
    low = nibbles(blocks["ql"].reshape(*lead, 2, 64))  # [..., 2, 128]
    high = (blocks["qh"].reshape(*lead, 2, 1, 32) >> PAIRS) & np.uint8(3)  # [..., 2, 4, 32]
    q = (low | (high.reshape(*lead, 2, 128) << np.uint8(4))).astype(np.int8) - np.int8(32)
    d = f32(blocks["d"])[..., None] * blocks["scales"].astype(np.float32)  # [..., 16]
    return (d[..., None] * q.reshape(*lead, 16, 16).astype(np.float32)).reshape(*lead, BLOCK)


def _rule(x, out):  # x float32 [B, 256] -> out [B]
    sub = x.reshape(-1, 16)
    scales, L = symmetric_search(sub, 32)
    scales = scales.reshape(-1, 16)
    L = L.reshape(len(x), 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # the reference zeroes such a super-block
    iscale = (np.float32(-128) / np.where(zero, np.float32(1), max_scale)).astype(np.float32)
    d = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, nearest(iscale[:, None] * scales)).astype(np.int8)
    dd = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # [B, 16]
    nz = dd != 0
    q = np.clip(nearest(x.reshape(-1, 16, 16) / np.where(nz, dd, np.float32(1))[:, :, None]), -32, 31) + 32
    L = np.where(nz[:, :, None], q.astype(np.uint8), L).reshape(-1, 2, 4, 32)  # [B, half, quarter, 32]
    L[zero] = 0
    sc[zero], d[zero] = 0, 0
    out["ql"] = ((L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)).reshape(-1, 128)
    hi = (L >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    out["qh"] = hi.sum(axis=2, dtype=np.uint8).reshape(-1, 64)
    out["scales"], out["d"] = sc, d


def quantize(w):  # float32 [rows, cols] (cols a multiple of 256) -> blocks [rows, cols / 256]
    return quantize_blocks(w, DTYPE, BLOCK, _rule)


class Matrix(_Matrix):
    NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS = NAME, GGML_TYPE, BLOCK, DTYPE, ACTIVATIONS
    dequantize_blocks = staticmethod(dequantize)
