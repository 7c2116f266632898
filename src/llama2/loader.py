"""Open any model file we can run: dispatch on what the path is, never on its name's words.

A directory with config.json is a Hugging Face model (hf.py); a file starting with "GGUF" is a GGUF
model (gguf.py); anything else is a llama2.c checkpoint, versions 0-3 (checkpoint.py).
"""

from pathlib import Path

from . import checkpoint
from .errors import FormatError


def load_checkpoint(path) -> checkpoint.Checkpoint:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        from . import hf
        return hf.load(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from . import gguf
        return gguf.load(path)
    return checkpoint.load(path)
