"""Export any model we can read to a llama2.c checkpoint (versions 0-3) or a GGUF file, streaming.

A source is anything with `config` (ModelConfig), `tensor(name, layer) -> float32 array` in our
layout (checkpoint.tensor_shapes, one layer at a time), `vocab` (formats.vocab.Vocab or None) and
`chat_template` (a chat_template.ChatTemplate, a built-in name, or None): hf.HFModel, meta.MetaModel, CheckpointSource.
Writers pull one tensor at a time, so memory stays near one layer plus the output buffer.
"""

import sys
from dataclasses import replace

import numpy as np

from . import checkpoint, formats
from .checkpoint import Checkpoint
from .errors import FormatError
from .formats import llama2c

FORMATS = formats.WRITERS
VERSIONS = llama2c.VERSIONS  # --version: llama2.c's layouts, and 2 (Q8_0) for every format
# every writer's dtypes, in order: llama2.c's fp32, fp16, bf16, q8_0, then GGUF's llama.cpp types
DTYPES = tuple(dict.fromkeys(d for fmt in FORMATS for d in formats.writer(fmt).WRITE_DTYPES))
DEFAULT_VERSION = llama2c.EXT_VERSION  # the header that carries everything
DEFAULT_GROUP_SIZE = 64


def materialize(source, path, fmt) -> Checkpoint:
    """Read a whole source into a Checkpoint of stacked float32 tensors (for direct loading)."""
    c = source.config
    weights = {}
    for name, shape in checkpoint.tensor_shapes(c).items():
        if name in checkpoint.STACKED:
            weights[name] = np.empty(shape, np.float32)
            for layer in range(c.n_layers):
                weights[name][layer] = source.tensor(name, layer)
        else:
            weights[name] = np.ascontiguousarray(source.tensor(name), dtype=np.float32)
    return Checkpoint(c, weights, 1, path, vocab=source.vocab, chat_template=source.chat_template,
                      format=fmt, kv_type=formats.reader(fmt).KV_TYPE)


class LoRASource:
    """A source with a LoRA adapter merged in: W + (alpha / rank) B A for each matrix it adapts,
    computed one tensor at a time (so any format and type we export can hold a finetune)."""

    def __init__(self, source, adapter_path):
        from .formats import adapter
        self.source, self.config = source, source.config
        self.vocab, self.chat_template = source.vocab, source.chat_template
        self.adapter = adapter.read(adapter_path, source.config)

    def tensor(self, name, layer=None) -> np.ndarray:
        w = self.source.tensor(name, layer) if layer is not None else self.source.tensor(name)
        delta = self.adapter.delta(name, layer)
        return w if delta is None else np.asarray(w, np.float32) + delta


def stored_by(dtype) -> list:
    """The formats whose files store `dtype`."""
    return [fmt for fmt in FORMATS if dtype in formats.writer(fmt).WRITE_DTYPES]


def export(out, source, fmt="llama2c", version=DEFAULT_VERSION, dtype="fp32",
           group_size=DEFAULT_GROUP_SIZE, vocab=None, chat_template=None, warn=None):
    """Write `source` to `out` as `fmt` (one of formats.WRITERS), through its module's `export`.
    llama2c: `version` 0, 1, 2 (Q8_0, `group_size`) are exactly llama2.c's layouts; 3 is ours with
    `dtype` (fp32, fp16, bf16, q8_0). gguf: `dtype` (or version 2: Q8_0) picks the type: a float
    type, or a llama.cpp file type (q4_0 ... q5_k_m) whose per-tensor types and bytes are
    llama.cpp's quantizer's."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    config = source.config
    vocab = vocab if vocab is not None else source.vocab
    template = chat_template if chat_template is not None else source.chat_template
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r} (expected {' or '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    if version not in VERSIONS:
        raise FormatError(f"unknown version {version} (expected 0, 1, 2 or 3)")
    if version == 2:
        dtype = "q8_0"
    writer = formats.writer(fmt)
    if dtype not in writer.WRITE_DTYPES:
        raise FormatError(f"--dtype {dtype} is for --format {' or '.join(stored_by(dtype))}; "
                          f"{writer.FILES} store {', '.join(writer.WRITE_DTYPES)}")
    if vocab is not None and len(vocab) < config.vocab_size:
        raise FormatError(f"the tokenizer has {len(vocab)} tokens but the model's vocabulary has "
                          f"{config.vocab_size}")
    if vocab is not None:
        config = replace(config, bos_id=vocab.bos_id, eos_id=vocab.eos_id)
    writer.export(out, config, source.tensor, vocab, dtype, version, group_size, template, warn)
