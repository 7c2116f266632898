"""Which weight type each tensor of a quantized file gets: llama.cpp's per-tensor rules (mix.py).

    tensor_type("q4_k_m", "blk.3.ffn_down.weight", 3, 32) -> "q6_k"

The types themselves, and how a matrix is quantized into each (llama.cpp's reference rules, its
bytes), are the weight types' own: weights/<type>.py, `weights.encode(kind, w)`.
"""

from .mix import FILE_TYPES, MIXES, QUANTIZE_HELP, QUANTIZE_TYPES, tensor_type

__all__ = ["MIXES", "FILE_TYPES", "QUANTIZE_TYPES", "QUANTIZE_HELP", "tensor_type"]
