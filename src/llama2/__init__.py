"""llama2: train and run Llama 2 models from Python.

Reads llama2.c checkpoints and tokenizers and generates the same bytes as llama2.c's run.c.
"""

from .config import ModelConfig
from .errors import FormatError, Llama2Error, UsageError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Llama2Error", "UsageError", "FormatError", "__version__"]

from .llama import Llama  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ += ["Llama", "Tokenizer"]
