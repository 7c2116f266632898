"""Open any model file we can run: dispatch on what the path is, never on its name's words.

A directory with config.json is a Hugging Face model (hf.py); a file starting with "GGUF" is a GGUF
model (gguf.py); anything else is a llama2.c checkpoint, versions 0-3 (checkpoint.py).
"""

from pathlib import Path

from .. import checkpoint
from ..errors import FormatError
from . import llama2c


def model_kind(path) -> str:
    """"hf", "gguf" or "llama2c", from what the path holds."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        return "hf"
    with open(path, "rb") as f:
        return "gguf" if f.read(4) == b"GGUF" else "llama2c"


def load_checkpoint(path) -> checkpoint.Checkpoint:
    """The whole model, ready for the forward pass."""
    kind = model_kind(path)
    if kind == "hf":
        from . import hf
        return hf.load(path)
    if kind == "gguf":
        from . import gguf
        return gguf.load(path)
    return llama2c.load(path)


def open_source(path):
    """The model as a tensor source for export.py, read one tensor at a time."""
    kind = model_kind(path)
    if kind == "hf":
        from .hf import HFModel
        return HFModel(path)
    if kind == "gguf":
        from .gguf import GGUFModel
        return GGUFModel(path)
    from ..checkpoint import CheckpointSource
    return CheckpointSource(llama2c.load(path))
