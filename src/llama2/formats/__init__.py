"""The model file formats, one module each, and the choice between them by what a path holds.

`llama2c` (llama2.c .bin, versions 0-3), `gguf` (llama.cpp) and `hf` (Hugging Face folders) are read
into a `Checkpoint` (`load_checkpoint`) or opened as an export source (`open_source`), told apart by
their contents, never by a name's words. `meta` (Meta and llama2.c training checkpoints, needs torch)
is an export source named by its own flag; `vocab` reads and writes tokenizer files (bfloat16's
conversions, which the binary formats share, are the weight type's: weights/bf16.py). `llama2c`
and `gguf` are also written (`WRITERS`, for export.py).
"""

from importlib import import_module
from pathlib import Path

from ..fileio import read_user_file

# The formats `model_kind` asks, in order. Each module has `matches(path, head) -> bool` (head: the
# file's first HEAD_BYTES bytes, None for a directory), `load(path) -> Checkpoint` and
# `source(path)`, the model as a tensor source for export.py. llama2c comes last: it takes any file
# (version 0 has no magic), and its loader says what is wrong with one that is not a checkpoint.
READERS = ("hf", "gguf", "llama2c")
HEAD_BYTES = 8
# Each reader also has `describe(path) -> (ModelConfig, stored)`: how each matrix is stored, from the
# file's headers alone (stored: tensor name -> a kind as weights.stored_type takes it, or a list of
# kinds per layer; norms left out), for memory.py's estimate before anything is loaded; and
# `KV_TYPE`, the KV cache type its models get by default (put on its Checkpoints; memory.py's
# estimate and --kv-type's help read it too).

# The formats export.py writes, in --format's order. Each module has `WRITE_DTYPES` (the --dtype
# values it stores), `FILES` (what its files are called in messages) and `export(path, config,
# tensor, vocab, dtype, version, group_size, chat_template, warn)`: its own checks and warnings,
# then the file, written to a temporary and renamed.
WRITERS = ("llama2c", "gguf", "hf")


def reader(kind):
    """The module of format `kind` (one of READERS or WRITERS), imported when first asked for."""
    return import_module(f"{__name__}.{kind}")


writer = reader


def model_kind(path) -> str:
    """"hf", "gguf" or "llama2c", from what the path holds."""
    path = Path(path)
    head = None
    if not path.is_dir():  # a directory is a Hugging Face folder; anything else a regular file
        head = read_user_file(path, "model file", HEAD_BYTES, exact=False)
    return next(kind for kind in READERS if reader(kind).matches(path, head))


def load_checkpoint(path):
    """The whole model as a Checkpoint, ready for the forward pass."""
    return reader(model_kind(path)).load(path)


def open_source(path):
    """The model as a tensor source for export.py, read one tensor at a time."""
    return reader(model_kind(path)).source(path)


def default_kv_types() -> dict:
    """Format -> the KV cache type its models get when none is asked for."""
    return {kind: reader(kind).KV_TYPE for kind in READERS}


def describe(path):
    """(ModelConfig, how each matrix is stored) from the model's headers alone."""
    return reader(model_kind(path)).describe(path)
