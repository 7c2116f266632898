"""bfloat16 as files store it (uint16: the upper half of a float32), to and from float32: what the
llama2.c (version 3 bf16), GGUF (BF16) and Hugging Face (BF16 safetensors) formats share.
"""

import numpy as np


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:  # uint16 [...] -> float32 [...] (exact)
    out = np.asarray(u16, dtype="<u2").astype(np.uint32)
    out <<= 16  # in place: one float32-sized buffer, no temporaries
    return out.view(np.float32)


def f32_to_bf16(a: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:  # float32 [...] -> uint16 [...]
    """Round to nearest even (NaN stays NaN), `chunk` values at a time to keep temporaries small."""
    f = np.ascontiguousarray(a, dtype="<f4").reshape(-1)
    u = f.view(np.uint32)
    out = np.empty(u.size, "<u2")
    for i in range(0, u.size, chunk):
        x = u[i:i + chunk]
        out[i:i + chunk] = (x + (np.uint32(0x7FFF) + ((x >> 16) & np.uint32(1)))) >> 16
        nan = np.isnan(f[i:i + chunk])
        if nan.any():
            out[i:i + chunk][nan] = (x[nan] >> 16) | np.uint32(0x40)  # keep it a quiet NaN
    return out.reshape(np.shape(a))
