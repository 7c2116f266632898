"""Train a sentencepiece tokenizer on raw text and export it in llama2.c's tokenizer.bin format.

Trainer settings follow llama2.c's tinystories.py (BPE, byte fallback, digits split, identity
normalization); the export follows llama2.c's tokenizer.py, so tok512.model exports to tok512.bin.
"""

import os
import tempfile
from pathlib import Path

from ..errors import Llama2Error
from ..fileio import atomic_write
from .stories import read_inputs


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise Llama2Error("tokenizer training needs sentencepiece: pip install sentencepiece") from None
    return sentencepiece


def train_tokenizer(inputs, vocab_size: int, out_prefix, *, separator=None, text_field=None,
                    max_sentences: int = 1_000_000, threads: int = 0, progress=None) -> tuple:
    """Train a BPE sentencepiece model of `vocab_size` pieces on the stories in `inputs` (the
    formats `llama2 data prepare` reads); write OUT_PREFIX.model and OUT_PREFIX.bin. Returns both paths.

    At most `max_sentences` lines are sampled (shuffled) by sentencepiece, as tinystories.py does.
    """
    spm = _sentencepiece()
    if vocab_size < 259 + 3 or vocab_size > 1 << 20:
        # byte fallback needs the 256 byte pieces plus unk, bos and eos
        raise Llama2Error(f"--vocab-size must be at least 262 (256 byte pieces + <unk> <s> </s>), "
                          f"got {vocab_size}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    bin_path = out_prefix.with_name(out_prefix.name + ".bin")
    with tempfile.TemporaryDirectory(prefix=".tok-", dir=out_prefix.parent) as tmp:
        text_path = Path(tmp) / "stories.txt"
        count = 0
        with open(text_path, "w", encoding="utf-8") as f:
            for story in read_inputs(inputs, separator=separator, text_field=text_field,
                                          progress=progress):
                f.write(story + "\n")
                count += 1
        if count == 0:
            raise Llama2Error("no stories in the input files to train a tokenizer on")
        prefix = Path(tmp) / "tok"
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_path), model_prefix=str(prefix), model_type="bpe",
                vocab_size=vocab_size, input_format="text",
                character_coverage=1.0, num_threads=threads or os.cpu_count() or 1,
                split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
                unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                input_sentence_size=max_sentences, shuffle_input_sentence=True,
                minloglevel=2)
        except RuntimeError as e:
            # e.g. "Vocabulary size is too high (1000). Please set it to a value <= 700."
            reason = str(e).strip().splitlines()[0].rsplit("] ", 1)[-1]  # drop the C++ source location
            raise Llama2Error(f"sentencepiece could not train a {vocab_size}-piece vocabulary: "
                              f"{reason}") from None
        with atomic_write(model_path) as f:
            f.write((Path(tmp) / "tok.model").read_bytes())
    export_bin(model_path, bin_path)
    return model_path, bin_path


def export_bin(model_path, bin_path):
    """Write a sentencepiece model as llama2.c tokenizer.bin (llama2.formats.vocab does the work:
    BOS/EOS become "\\n<s>\\n" / "\\n</s>\\n", "▁" a space, byte pieces stay "<0xHH>")."""
    from ..formats.vocab import from_sentencepiece, write_bin

    write_bin(bin_path, from_sentencepiece(model_path))
    return bin_path


class Encoder:
    """text -> token ids with BOS (and optionally EOS), from a sentencepiece .model (fast) or a
    llama2.c tokenizer.bin (our own encoder, identical to run.c's)."""

    def __init__(self, path):
        self.path = str(path)
        self._sp = None
        self._tok = None
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise Llama2Error(f"{path}: cannot read tokenizer: {e.strerror}") from None
        try:
            spm = _sentencepiece()
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(raw)
            self._sp = sp
            self.vocab_size, self.bos_id, self.eos_id = sp.GetPieceSize(), sp.bos_id(), sp.eos_id()
        except (RuntimeError, Llama2Error):
            from ..tokenizer import Tokenizer  # a llama2.c tokenizer.bin
            self._tok = Tokenizer.load(path)
            self.vocab_size, self.bos_id, self.eos_id = self._tok.vocab_size, 1, 2

    def encode(self, text: str, eos: bool = False) -> list:
        if self._sp is not None:
            ids = [self.bos_id] + self._sp.EncodeAsIds(text)
            return ids + [self.eos_id] if eos else ids
        return self._tok.encode(text, bos=True, eos=eos)

    def write_bin(self, out_path):
        """Save this tokenizer as llama2.c tokenizer.bin (for `llama2 run -z`)."""
        if self._sp is not None:
            return export_bin(self.path, out_path)
        with atomic_write(out_path) as f:
            f.write(Path(self.path).read_bytes())
        return out_path
