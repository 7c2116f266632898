"""ggml's 32-value blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, quantized by llama.cpp's reference rules.

Without an importance matrix llama.cpp quantizes these types by a fixed round-to-nearest rule
(ggml-quants.c, quantize_row_*_ref), so the bytes here equal llama.cpp's. Every step is done in
float32 in the same order as the reference:

    Q8_0  d = amax / 127,            q = round-half-away(x / d)                 (int8)
    Q4_0  d = max / -8  (max: the value of largest magnitude, sign kept, first one on ties),
          q = min(15, trunc(x * (1/d) + 8.5))                                   (4 bits)
    Q5_0  d = max / -16,             q = min(31, trunc(x * (1/d) + 16.5))       (5 bits)
    Q4_1  d = (max - min) / 15,      q = min(15, trunc((x - min) * (1/d) + 0.5)), m = min
    Q5_1  d = (max - min) / 31,      q = trunc((x - min) * (1/d) + 0.5),          m = min

Scales are stored as float16 (round to nearest even); 1/d is taken from the float32 d. Values j and
j + 16 of a block share a byte of `qs` (low and high nibble); Q5's fifth bits go to the 32-bit
little-endian `qh`, bit j for value j.
"""

import numpy as np

QK = 32  # values per block
CHUNK = 1 << 15  # blocks quantized at once (bounds the float32 temporaries)

# block layouts, as ggml's block_q* structs (little-endian, packed)
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # 18 bytes
Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 20 bytes
Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])  # 22 bytes
Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])  # 24 bytes
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 34 bytes

_F = np.float32


def _inverse(d):  # [B] float32 -> 1/d, 0 where d == 0 (as `id = d ? 1/d : 0`)
    return np.divide(_F(1), d, out=np.zeros_like(d), where=d != 0)


def _signed_max(x):  # x [B, 32] -> [B]: the value of largest magnitude (first on ties), sign kept
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _nibbles(q):  # q uint8 [B, 32] (values < 16 after masking) -> qs [B, 16]
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q):  # q uint8 [B, 32] of 5-bit values -> qh uint32 [B]: bit j = bit 4 of value j
    bits = ((q >> 4) & 1).astype(np.uint32)
    return (bits << np.arange(QK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _q8_0(x, out):
    d = (np.abs(x).max(axis=1) / _F(127)).astype(_F)
    v = x * _inverse(d)[:, None]
    out["qs"] = np.sign(v) * np.floor(np.abs(v) + _F(0.5))  # roundf: half away from zero
    out["d"] = d


def _symmetric(x, levels):  # Q4_0 (levels 16) / Q5_0 (32): -> (d float32 [B], q uint8 [B, 32])
    d = (_signed_max(x) / _F(-levels // 2)).astype(_F)
    v = x * _inverse(d)[:, None] + _F(levels // 2 + 0.5)
    return d, np.minimum(levels - 1, np.trunc(v)).astype(np.uint8)


def _affine(x, levels, clamp):  # Q4_1 (16) / Q5_1 (32): -> (d, min, q uint8 [B, 32])
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = ((hi - lo) / _F(levels - 1)).astype(_F)
    v = np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + _F(0.5))
    if clamp:
        v = np.minimum(levels - 1, v)
    return d, lo, v.astype(np.uint8)


def _q4_0(x, out):
    d, q = _symmetric(x, 16)
    out["d"], out["qs"] = d, _nibbles(q)


def _q5_0(x, out):
    d, q = _symmetric(x, 32)
    out["d"], out["qh"], out["qs"] = d, _high_bits(q), _nibbles(q)


def _q4_1(x, out):
    d, m, q = _affine(x, 16, clamp=True)
    out["d"], out["m"], out["qs"] = d, m, _nibbles(q)


def _q5_1(x, out):
    d, m, q = _affine(x, 32, clamp=False)  # the reference does not clamp Q5_1 (values stay <= 31)
    out["d"], out["m"], out["qh"], out["qs"] = d, m, _high_bits(q), _nibbles(q)


# name -> (block dtype, block quantizer)
TYPES = {"q4_0": (Q4_0, _q4_0), "q4_1": (Q4_1, _q4_1), "q5_0": (Q5_0, _q5_0),
         "q5_1": (Q5_1, _q5_1), "q8_0": (Q8_0, _q8_0)}


def quantize_blocks(x, name):  # x float32 [N] (N a multiple of 32) -> structured blocks [N / 32]
    block, rule = TYPES[name]
    x = np.ascontiguousarray(x, _F).reshape(-1, QK)
    out = np.empty(len(x), block)
    with np.errstate(under="ignore"):  # tiny values underflow quietly, as in C
        for b0 in range(0, len(x), CHUNK):
            rule(x[b0:b0 + CHUNK], out[b0:b0 + CHUNK])
    return out
