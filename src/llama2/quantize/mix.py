"""Which type each tensor of a quantized file gets: llama.cpp's per-tensor rule
(llama-quant.cpp, llama_tensor_get_type) for the Llama architecture, without an importance matrix.

A file type ("mix") names a base type for the matrices; then:
- norms (1-D) stay F32;
- the classifier (output.weight; token_embd.weight when the file has no output.weight) is Q6_K,
  except in Q8_0 files (Q8_0) and when its rows are not a multiple of 256 (Q8_0);
- Q4_K_M and Q5_K_M give Q6_K to attn_v and ffn_down in the layers where `use_more_bits` holds:
  the first and last eighth of the layers and every third layer between;
- Llama-2-70B-shaped models (80 layers, grouped-query attention) keep attn_v at Q5_K at least;
- a k-quant whose rows are not a multiple of 256 falls back as llama.cpp does: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when rows are not a multiple of 32 either.
q4_k and q5_k (no llama.cpp file type of that name) are the base type everywhere but the
classifier; q6_k, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m and q5_k_m are llama.cpp's file types.
"""

import re

# mix -> base type
MIXES = {"q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0",
         "q4_k": "q4_k", "q5_k": "q5_k", "q6_k": "q6_k", "q4_k_m": "q4_k", "q5_k_m": "q5_k"}
# GGUF general.file_type (llama_ftype); q4_k / q5_k are recorded as the nearest, Q4_K_S / Q5_K_S
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 14, "q4_k_m": 15,
              "q5_k": 16, "q5_k_m": 17, "q6_k": 18}

# our checkpoint names -> GGUF's (without "blk.N." and ".weight")
_OURS = {"token_embedding": "token_embd", "wcls": "output", "rms_final": "output_norm",
         "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "rms_att": "attn_norm",
         "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up", "rms_ffn": "ffn_norm"}
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def base_name(tensor_name):  # "blk.3.attn_v.weight" or "wv" -> "attn_v"
    name = _OURS.get(tensor_name, tensor_name)
    return re.sub(r"^blk\.\d+\.|\.weight$", "", name)


def use_more_bits(layer, n_layers) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(mix, tensor_name, layer=None, n_layers=None, cols=None, has_output=True,
                n_heads=None, n_kv_heads=None) -> str:
    """The weight type (a weights module's name) of tensor `tensor_name` (GGUF's name or ours) of
    block `layer` of `n_layers` in a file of type `mix`. `cols` (row length) applies llama.cpp's
    fallbacks for rows that do not fill k-quant blocks; `has_output` False makes token_embd the
    classifier."""
    if mix not in MIXES:
        raise ValueError(f"unknown quantization {mix!r} (expected one of {', '.join(MIXES)})")
    base = base_name(tensor_name)
    if base.endswith("norm"):
        return "f32"
    kind = MIXES[mix]
    if base == "output" or (base == "token_embd" and not has_output):
        if cols is not None and cols % 256:
            return "q8_0"
        return "q8_0" if kind == "q8_0" else "q6_k"
    if mix in ("q4_k_m", "q5_k_m") and base in ("attn_v", "ffn_down"):
        if layer is None or n_layers is None:
            raise ValueError(f"{mix}: the type of {tensor_name} depends on its layer and the layer count")
        if use_more_bits(layer, n_layers):
            kind = "q6_k"
    if base == "attn_v" and n_layers == 80 and n_heads and n_kv_heads and n_heads != n_kv_heads \
            and kind == "q4_k":  # llama.cpp's rule for 70B: 8 heads share each attn_v
        kind = "q5_k"
    if cols is not None and kind in _FALLBACK and cols % 256:
        kind = _FALLBACK[kind]
        if cols % 32:
            kind = "f16"
    return kind


# `--quantize TYPE` at load (llama2 run / serve): q8_0 runs our int8 kernels; the others are
# quantized as in a GGUF of that file type, tensor by tensor
QUANTIZE_TYPES = tuple(MIXES)
QUANTIZE_HELP = ("quantize float weights at load: q8_0 (int8), q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, "
                 "q6_k, or the mixes q4_k_m, q5_k_m (types per tensor as llama.cpp's quantizer "
                 "picks them)")
