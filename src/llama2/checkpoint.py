"""A loaded model, whatever file it came from: its config, its tensors in our layout, and what the
file said about itself (vocabulary, chat template, how its matrices are stored).

Our layout is llama2.c's: per-layer tensors stacked or listed by layer, named as `tensor_shapes`
says. Each module of `llama2.formats` reads its files into a `Checkpoint` and writes from a tensor
source (`CheckpointSource` makes a `Checkpoint` one).
"""

import functools
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .weights import dense as _dense

# Tensor names in a checkpoint, with shapes in terms of the config; "L" stacked layers.
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NORMS = ("rms_att", "rms_ffn", "rms_final")
MATRICES = ("token_embedding", *LAYER_MATRICES)
STACKED = ("rms_att", "rms_ffn", *LAYER_MATRICES)


def tensor_shapes(c: ModelConfig) -> dict:
    """name -> shape (per layer for stacked tensors: the leading n_layers axis is included)."""
    L, D, H, KV, V, Q = c.n_layers, c.dim, c.hidden_dim, c.kv_dim, c.vocab_size, c.q_dim
    shapes = {
        "token_embedding": (V, D),
        "rms_att": (L, D),
        "wq": (L, Q, D),
        "wk": (L, KV, D),
        "wv": (L, KV, D),
        "wo": (L, D, Q),
        "rms_ffn": (L, D),
        "w1": (L, H, D),
        "w2": (L, D, H),
        "w3": (L, H, D),
        "rms_final": (D,),
    }
    if not c.shared_classifier:
        shapes["wcls"] = (V, D)
    return shapes


def matrix_kinds(c: ModelConfig, kind) -> dict:
    """How each matrix of `c` is stored, asking `kind(name, layer)` (layer None for unstacked ones):
    name -> a kind, or a list of kinds per layer for LAYER_MATRICES. Norms are left out."""
    return {name: [kind(name, l) for l in range(c.n_layers)] if name in LAYER_MATRICES else kind(name, None)
            for name in tensor_shapes(c) if not name.startswith("rms")}


@dataclass
class Checkpoint:
    """A loaded model file: its config, tensors (numpy views of the mmap where possible), version."""
    config: ModelConfig
    weights: dict  # name -> float32 array (stacked; f32 matrices and norms), or per layer a list of
    #                weights.Matrix (other stored types), or one Matrix for unstacked matrices
    version: int  # llama2.c layout version 0-3; 1 for models from other formats (see `format`)
    path: str
    group_size: int = 0  # Q8_0 group size when matrices are QuantizedTensor, else 0
    dtype: str = "fp32"  # how the file stores its matrices: fp32, fp16, bf16, q8_0, a GGUF type, mixed
    vocab: object = None  # a formats.vocab.Vocab when the model carries its own vocabulary
    chat_template: object = None  # the model's chat_template.ChatTemplate, a built-in name, or None
    format: str = "llama2c"  # llama2c, gguf, hf
    kv_type: str = "f32"  # the KV cache type its models get unless asked: its format's KV_TYPE

    @property
    def quantized(self) -> bool:
        return self.group_size > 0

    @functools.cached_property
    def tokenizer(self):
        """The model's own tokenizer (a llama2.tokenizer.Tokenizer, or a bytelevel.ByteLevelTokenizer
        for byte-level BPE), or None if it has no vocabulary; built once (Llama 3's 128k pieces and
        280k merges take a few tenths of a second)."""
        if self.vocab is None:
            return None
        return self.vocab.tokenizer(self.path, self.config.vocab_size)

    def dense(self, name) -> np.ndarray:
        """A tensor as float32 (dequantized if stored otherwise), stacked per layer."""
        return _dense(self.weights[name])

    @property
    def classifier(self):
        return self.weights["token_embedding"] if self.config.shared_classifier else self.weights["wcls"]


class CheckpointSource:
    """A loaded Checkpoint (any format the loader reads) as a source; tensors stored in other types
    are dequantized one layer at a time."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.config = ckpt, ckpt.config
        self.vocab, self.chat_template = ckpt.vocab, ckpt.chat_template

    def tensor(self, name, layer=None) -> np.ndarray:
        w = self.ckpt.weights[name]
        if layer is not None:
            w = w[layer]
        return _dense(w)

