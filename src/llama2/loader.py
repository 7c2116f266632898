"""Open any model file we can run: dispatch on what the path is, never on its name's words.

llama2.c `.bin` checkpoints (versions 0-2) are handled by `checkpoint`; other sources add a branch here.
"""

from pathlib import Path

from . import checkpoint
from .errors import FormatError


def load_checkpoint(path) -> checkpoint.Checkpoint:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    return checkpoint.load(path)
