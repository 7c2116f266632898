"""`Llama`: the Python API. A loaded model plus its tokenizer, with generate, logits and chat turns."""

from pathlib import Path

import numpy as np

from . import hub
from .threads import set_threads
from .config import DEFAULT_TOKENIZER, GENERATION
from .errors import FormatError
from .generate import Event, generate
from .loader import load_checkpoint
from .model import Transformer
from .sampler import Sampler
from .tokenizer import Tokenizer


def find_tokenizer(checkpoint_path, name=None) -> Path:
    """The tokenizer to use: `name` as given or cached; without one, `tokenizer.bin` in the current
    folder (as run.c), beside the checkpoint (inside it for a model directory), or in the cache
    (downloaded on first use)."""
    if name is not None:
        return hub.resolve(name, what="tokenizer")
    path = Path(checkpoint_path)
    folder = path if path.is_dir() else path.parent  # a model directory holds its own files
    for candidate in (Path(DEFAULT_TOKENIZER), folder / DEFAULT_TOKENIZER):
        if candidate.is_file():
            return candidate
    return hub.resolve(DEFAULT_TOKENIZER, what="tokenizer")


class Llama:
    """A model ready to run: `Llama.load("stories15M.bin")`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, checkpoint=None):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.config = model.config

    @classmethod
    def load(cls, checkpoint, tokenizer=None, quantize=None, threads=None) -> "Llama":
        """Load a checkpoint (path; downloaded if it is a known default) and its tokenizer (a path, a
        Tokenizer, or None: the checkpoint's own vocabulary if it has one, else tokenizer.bin).
        `quantize="q8_0"` runs float weights as int8; `threads` (default: all cores) applies to
        every kernel, BLAS included."""
        set_threads(threads)
        path = hub.resolve(checkpoint, what="model")
        ckpt = load_checkpoint(path)
        vocab = ckpt.config.vocab_size
        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif tokenizer is None and getattr(ckpt, "tokenizer", None) is not None:
            tok = ckpt.tokenizer
        else:
            tok = Tokenizer.load(find_tokenizer(path, tokenizer), vocab_size=vocab)
        if tok.vocab_size < vocab:
            raise FormatError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model's "
                              f"vocabulary has {vocab}")
        return cls(Transformer(ckpt, quantize=quantize), tok, ckpt)

    def encode(self, text, bos=True, eos=False) -> list:
        return self.tokenizer.encode(text, bos=bos, eos=eos)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits, float32 [len(token_ids), vocab], through the same forward pass."""
        ids = list(token_ids)
        cache = self.model.new_cache()
        return self.model.forward(ids, cache, all_logits=True)

    def stream(self, prompt="", steps=GENERATION.steps, temperature=GENERATION.temperature,
               top_p=GENERATION.top_p, seed=GENERATION.seed):
        """Yield generation Events (see llama2.generate.Event); prompt tokens are echoed first."""
        sampler = Sampler(self.config.vocab_size, temperature, top_p, seed)
        yield from generate(self.model, self.tokenizer, sampler, self.encode(prompt), steps)

    def generate(self, prompt="", steps=GENERATION.steps, temperature=GENERATION.temperature,
                 top_p=GENERATION.top_p, seed=GENERATION.seed):
        """Yield the text pieces of a completion of `prompt` (the prompt itself is not repeated).
        `steps` counts positions, prompt included, as run.c's -n; 0 means the whole context."""
        for event in self.stream(prompt, steps, temperature, top_p, seed):
            if not event.is_prompt and event.text:
                yield event.text

    def __call__(self, prompt="", **kwargs) -> str:
        return "".join(self.generate(prompt, **kwargs))


__all__ = ["Llama", "Event"]
