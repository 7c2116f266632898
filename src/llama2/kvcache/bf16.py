"""KV type bf16: the top 16 bits of each float32, rounded to nearest even (NaN kept quiet).

The numpy reference of native/kv.h's bf16 record (tests hold the native encode to it bit for bit).
"""

import numpy as np


def encode(x):  # float32 [..., hd] -> uint8 [..., 2 hd]
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
    return out.view(np.uint8)


def decode(rows, hd: int):  # uint8 [..., 2 hd] -> float32 [..., hd]
    return (np.ascontiguousarray(rows).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
