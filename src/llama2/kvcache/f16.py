"""KV type f16: IEEE half per value, rounded to nearest even (llama.cpp's default cache type).

The numpy reference of native/kv.h's f16 record (tests hold the native encode to it bit for bit).
"""

import numpy as np


def encode(x):  # float32 [..., hd] -> uint8 [..., 2 hd]
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(np.float16)).view(np.uint8)


def decode(rows, hd: int):  # uint8 [..., 2 hd] -> float32 [..., hd]
    return np.ascontiguousarray(rows).view(np.float16).astype(np.float32)
