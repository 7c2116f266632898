"""KV type q8_0: each row of a head in groups of g = min(32, head_dim) values, a group stored as
{f16 d; int8 q[g]} (GGUF's block_q8_0 when g = 32): d = max|x| / 127, q = rint(x / d) in float32
(half to even, as native/act.c quantizes activations), value = d * q with d rounded to fp16.
About a quarter of f32's memory (34 bytes per 32 values); head_dim must be a multiple of g.

The numpy reference of native/kv.h's q8_0 record (tests hold the native encode to it bit for bit).
"""

import numpy as np


def encode(x):  # float32 [..., hd] -> uint8 [..., hd / g * (2 + g)]
    x = np.asarray(x, np.float32)
    hd = x.shape[-1]
    g = min(32, hd)
    xg = x.reshape(*x.shape[:-1], hd // g, g)
    d = np.abs(xg).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint(xg * inv), -127, 127).astype(np.int8)
    out = np.empty((*xg.shape[:-1], 2 + g), np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(*x.shape[:-1], -1)


def decode(rows, hd: int):  # uint8 [..., hd / g * (2 + g)] -> float32 [..., hd]
    g = min(32, hd)
    r = np.ascontiguousarray(rows).reshape(*rows.shape[:-1], hd // g, 2 + g)
    d = np.ascontiguousarray(r[..., :2]).view(np.float16).astype(np.float32)  # [..., groups, 1]
    q = r[..., 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(*rows.shape[:-1], hd)
