"""KV type f32: rows kept as float32, exactly as computed (llama2.c's cache; run.c's bytes)."""

import numpy as np

NAME = "f32"
ID = 0  # native/kernels.h KV_F32


def row_bytes(hd: int) -> int:
    return 4 * hd


def encode(x):  # float32 [..., hd] -> uint8 [..., 4 hd]
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def decode(rows, hd: int):  # uint8 [..., 4 hd] -> float32 [..., hd]
    return np.ascontiguousarray(rows).view(np.float32)
