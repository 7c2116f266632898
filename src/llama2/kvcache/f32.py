"""KV type f32: rows kept as float32, exactly as computed (llama2.c's cache; run.c's bytes).

The numpy reference of native/kv.h's f32 record (tests hold the native encode to it bit for bit).
"""

import numpy as np


def encode(x):  # float32 [..., hd] -> uint8 [..., 4 hd]
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def decode(rows, hd: int):  # uint8 [..., 4 hd] -> float32 [..., hd]
    return np.ascontiguousarray(rows).view(np.float32)
