"""The RoPE table of a model: cos and sin of every position's angle per frequency, the one record the
Python forward pass and the native kernels (every instruction-set level) read.

Unscaled: run.c's frequencies (1 / theta^(2i/hd)). Scaled (config.RopeScaling): "linear" divides
every frequency by the factor; "llama3" divides each by the factor llama.cpp's convert_hf_to_gguf.py
writes into rope_freqs (transformers' _compute_llama3_parameters, the same rule); "factors" takes
those divisors from the file; "dynamic" recomputes the base for each position past the original
context as transformers' _compute_dynamic_ntk_parameters does for a sequence that long.
Reference: transformers/modeling_rope_utils.py, llama.cpp's LlamaModel.generate_extra_tensors.
"""

import math

import numpy as np

from .config import ModelConfig, RopeScaling

F32 = np.float32


def base_frequencies(head_dim: int, theta: float) -> np.ndarray:  # -> float32 [head_dim / 2]
    """run.c: 1/powf(theta, i/head_dim) for even i, the power evaluated in float64 and rounded once,
    as a correctly rounded libm does."""
    i = np.arange(0, head_dim, 2, dtype=F32)
    return (1.0 / np.power(np.float64(F32(theta)), np.float64(i / F32(head_dim)))).astype(F32)


def llama3_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:  # -> float64 [hd/2]
    """Meta's Llama 3.1 rule as per-frequency divisors: short wavelengths keep their frequency,
    long ones are divided by `factor`, and those between are interpolated."""
    wavelen = 2 * math.pi / base_frequencies(head_dim, theta).astype(np.float64)
    low_wavelen = s.original_context / s.low_freq_factor
    high_wavelen = s.original_context / s.high_freq_factor
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    medium = 1.0 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, medium))


def divisors(c: ModelConfig):  # -> float64 [hd/2], or None
    """The per-frequency divisors of "llama3" and "factors" scaling: what GGUF's rope_freqs holds."""
    s = c.rope_scaling
    if s.kind == "llama3":
        return llama3_factors(c.head_dim, c.rope_theta, s)
    return np.asarray(s.freq_factors, np.float64) if s.kind == "factors" else None


def frequencies(c: ModelConfig, seq_len: int) -> np.ndarray:  # -> float32 [seq_len or 1, hd/2]
    """Each position's frequencies: one row shared by all positions, except for "dynamic" scaling,
    whose position p uses the base for a sequence of max(p + 1, original context) positions."""
    s, hd = c.rope_scaling, c.head_dim
    base = base_frequencies(hd, c.rope_theta)
    if s.kind == "none":
        return base[None, :]
    if s.kind == "linear":
        return (base / np.float64(s.factor)).astype(F32)[None, :]
    if s.kind in ("llama3", "factors"):
        return (base / divisors(c)).astype(F32)[None, :]
    # dynamic (NTK-aware): the base for a sequence of L positions, L = the position + 1
    L = np.maximum(np.arange(1, seq_len + 1, dtype=np.float64), s.original_context)[:, None]
    theta = c.rope_theta * (s.factor * L / s.original_context - (s.factor - 1)) ** (hd / (hd - 2))
    i = np.arange(0, hd, 2, dtype=np.float64)[None, :]
    return (1.0 / theta ** (i / hd)).astype(F32)


def tables(c: ModelConfig, seq_len: int = None):  # -> cos, sin: float32 [seq_len, head_dim / 2]
    """angle = position * frequency in float32, as run.c; cos and sin evaluated in float64 and
    rounded once."""
    seq_len = seq_len or c.seq_len
    angle = np.arange(seq_len, dtype=F32)[:, None] * frequencies(c, seq_len)  # float32 product, as in C
    return np.cos(angle.astype(np.float64)).astype(F32), np.sin(angle.astype(np.float64)).astype(F32)
