"""Export any model we can read to a llama2.c checkpoint (versions 0-3) or a GGUF file, streaming.

A source is anything with `config` (ModelConfig), `tensor(name, layer) -> float32 array` in our
layout (checkpoint.tensor_shapes, one layer at a time), `vocab` (formats.vocab.Vocab or None) and
`chat_template` (a chat.TEMPLATES name or None): hf.HFModel, meta.MetaModel, CheckpointSource.
Writers pull one tensor at a time, so memory stays near one layer plus the output buffer.
"""

import sys
from dataclasses import replace

import numpy as np

from . import checkpoint, quantize
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import FormatError
from .formats import llama2c

FORMATS = ("llama2c", "gguf")
VERSIONS = (0, 1, 2, llama2c.EXT_VERSION)
LLAMA2C_DTYPES = ("fp32", "fp16", "bf16", "q8_0")  # what a version-3 llama2.c file stores
# GGUF also takes llama.cpp's quantized file types (quantize.MIXES: q4_0 ... q6_k, q4_k_m, q5_k_m)
DTYPES = LLAMA2C_DTYPES + tuple(t for t in quantize.MIXES if t not in LLAMA2C_DTYPES)
DEFAULT_VERSION = llama2c.EXT_VERSION  # the header that carries everything
DEFAULT_GROUP_SIZE = 64
_DEFAULTS = ModelConfig(1, 1, 1, 1, 1, 1, 1)  # for "does llama2.c's layout lose this?"


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
                      format=fmt)


def lost_fields(config: ModelConfig) -> list:
    """Settings a llama2.c v0/v1/v2 header cannot carry that differ from what its readers assume."""
    return [f"{name}={getattr(config, name)}" for name in ("rope_theta", "norm_eps", "bos_id", "eos_id")
            if getattr(config, name) != getattr(_DEFAULTS, name)]


def export(out, source, fmt="llama2c", version=DEFAULT_VERSION, dtype="fp32",
           group_size=DEFAULT_GROUP_SIZE, vocab=None, chat_template=None, warn=None):
    """Write `source` to `out` as `fmt`. llama2c: `version` 0, 1, 2 (Q8_0, `group_size`) are exactly
    llama2.c's layouts; 3 is ours with `dtype` (fp32, fp16, bf16, q8_0). gguf: `dtype` (or version
    2: Q8_0) picks the type: a float type, or a llama.cpp file type (q4_0 ... q5_k_m) whose
    per-tensor types and bytes are llama.cpp's quantizer's."""
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
    if fmt == "llama2c" and dtype not in LLAMA2C_DTYPES:
        raise FormatError(f"--dtype {dtype} is for --format gguf; llama2.c files store "
                          f"{', '.join(LLAMA2C_DTYPES)}")
    if vocab is not None and len(vocab) != config.vocab_size:
        if len(vocab) < config.vocab_size:
            raise FormatError(f"the tokenizer has {len(vocab)} tokens but the model's vocabulary has "
                              f"{config.vocab_size}")
    if vocab is not None:
        config = replace(config, bos_id=vocab.bos_id, eos_id=vocab.eos_id)
    if fmt == "gguf":
        from .formats import gguf
        gguf.write(out, config, source.tensor, vocab, dtype, template)
        if vocab is None:
            warn("llama2: warning: no tokenizer given (--tokenizer): the GGUF has no vocabulary")
        return
    if version in (0, 1) and dtype != "fp32":
        raise FormatError(f"--version {version} stores fp32 only; use --version 3 for {dtype}")
    if version != llama2c.EXT_VERSION and lost_fields(config):
        warn(f"llama2: warning: llama2.c's version-{version} header cannot record "
             f"{', '.join(lost_fields(config))}; readers will assume the defaults (use --version 3)")
    if dtype == "q8_0" and group_size <= 0:
        raise FormatError(f"--group-size must be positive, got {group_size}")
    llama2c.write_stream(out, config, source.tensor, version, group_size if dtype == "q8_0" else 0,
                         dtype, template if version == llama2c.EXT_VERSION else None)
