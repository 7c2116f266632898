"""Structured output: a token mask per step from a JSON schema, a regex or a grammar (llguidance).

llguidance (the `llguidance` package: Rust, from the Guidance project) compiles the grammar and, at
each step, computes which tokens of *this model's vocabulary* may come next; the sampler sees the
logits of the others as -inf. The vocabulary is handed over as the bytes each token prints: a
`<0xNN>` byte-fallback piece is the byte NN, `<unk>`/BOS/EOS are special tokens (never text). EOS
(and any token that ends the reply) is allowed only where the grammar accepts. Why llguidance and
what it costs per token: docs/structured-output.md. The library is imported only when a grammar is
compiled, so inference runs without it.
"""

import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import Llama2Error

KINDS = ("json_schema", "json_object", "regex", "grammar")  # grammar: Lark or GBNF
# JSON as OpenAI writes it: no free whitespace between tokens (a sampled model would otherwise
# wander off into spaces and newlines), ", " and ": " as separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(Llama2Error):
    """A schema, regex or grammar that cannot be compiled; the message names what is wrong."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs the llguidance package: "
                           "pip install 'llama2[structured]'") from None
    return llguidance


@dataclass(frozen=True)
class Spec:
    """What the output must match: `kind` (one of KINDS) and its text (a JSON schema as a dict)."""
    kind: str
    source: object = None  # dict for json_schema, str for regex and grammar, None for json_object
    strict: bool = True  # json_schema: False ignores keywords llguidance does not implement

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(KINDS)}")


class Vocabulary:
    """A tokenizer as llguidance sees it: the bytes of every token, which are special, EOS.

    Built once per Tokenizer (`Vocabulary.of`); it also owns the thread that computes masks
    beside the forward pass.
    """

    _cache = weakref.WeakKeyDictionary()  # Tokenizer -> Vocabulary
    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int = None):
        llg = _llguidance()
        self.tokenizer = tokenizer
        n = vocab_size or tokenizer.vocab_size
        self.size = n
        special = {tokenizer.bos_id, tokenizer.eos_id}
        if tokenizer.pieces and tokenizer.pieces[0] == b"<unk>":
            special.add(0)
        special |= {i for i, p in enumerate(tokenizer.pieces[:n]) if p.startswith(b"<|") and p.endswith(b"|>")}
        tokens = []
        for i in range(n):
            # llguidance marks special tokens with a leading 0xFF byte (never part of UTF-8 text)
            tokens.append(b"\xff" + tokenizer.pieces[i].strip() if i in special else tokenizer.piece(-1, i))
        self.special = frozenset(special)
        # a piece that starts with a space loses it right after BOS (run.c's decode): such tokens
        # would print other bytes than the grammar saw, so they are not offered there
        self.space_first = np.array([tokenizer.space_after_bos_dropped and not (i in special)
                                     and tokenizer.pieces[i][:1] == b" "
                                     for i in range(n)], dtype=bool)
        # one-byte tokens that print their byte even after BOS (the `<0xNN>` pieces)
        self.byte_ids = [i for i in range(n) if i not in special and len(tokens[i]) == 1
                         and not self.space_first[i]]

        class _Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_id
            special_token_ids = sorted(special)

            def __call__(self, data):  # bytes that continue a text: no dummy-prefix space
                return tokenizer.encode(data, bos=False, prefix_space=False)

        _Wrapped.tokens = tokens
        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped()))
        self.words = (n + 31) // 32  # int32 words of a bitmask
        # masks of concurrent sequences (the server's batch) are computed side by side
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="llama2-mask")

    @classmethod
    def of(cls, tokenizer, vocab_size: int = None) -> "Vocabulary":
        with cls._lock:
            vocab = cls._cache.get(tokenizer)
            if vocab is None or (vocab_size and vocab.size != vocab_size):
                vocab = cls._cache[tokenizer] = cls(tokenizer, vocab_size)
            return vocab


def _read_text(kind, source) -> str:
    if not isinstance(source, str):
        raise GrammarError(f"{kind}: expected a string, got {type(source).__name__}")
    return source


def grammar_text(spec: Spec) -> str:
    """The llguidance grammar for `spec` (not yet checked against a vocabulary)."""
    llg = _llguidance()
    M = llg.LLMatcher
    if spec.kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        schema = spec.source
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"json_schema: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"json_schema: expected a JSON object, got {type(schema).__name__}")
        options = dict(JSON_OPTIONS, lenient=not spec.strict)
        try:
            return M.grammar_from_json_schema(schema, defaults=options)
        except ValueError as e:
            raise GrammarError(f"json_schema: {e}") from None
    if spec.kind == "regex":
        return M.grammar_from_regex(_read_text("regex", spec.source))
    try:  # Lark as is; llama.cpp's GBNF is told apart and converted to Lark by llguidance
        return llg.grammar_from("grammar", _read_text("grammar", spec.source))
    except ValueError as e:
        raise GrammarError(f"grammar: {_one_line(str(e))}") from None


class Grammar:
    """A compiled, checked grammar for one vocabulary; `constraint()` starts a fresh matcher."""

    def __init__(self, spec: Spec, vocab: Vocabulary):
        llg = _llguidance()
        self.spec, self.vocab = spec, vocab
        self.text = grammar_text(spec)
        error = llg.LLMatcher.validate_grammar(self.text, vocab.ll)
        if error:
            raise GrammarError(f"{spec.kind}: {_one_line(error)}")

    @classmethod
    def compile(cls, spec: Spec, tokenizer, vocab_size: int = None) -> "Grammar":
        return cls(spec, Vocabulary.of(tokenizer, vocab_size))

    def constraint(self, stop_tokens=(), after_bos: bool = False) -> "Constraint":
        return Constraint(self, stop_tokens, after_bos)


def _one_line(message: str) -> str:
    """llguidance's multi-line messages (source excerpts, carets) as one line."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip().strip("^")]
    return "; ".join(lines[:4]) if lines else "invalid"


class Constraint:
    """One sequence's matcher. Per step: `mask(logits)` gives the logits with disallowed tokens at
    -inf, `advance(token)` consumes the sampled token and starts computing the next mask on the
    vocabulary's mask thread, so it runs while the caller does the next forward pass. The matcher
    is only touched after that mask is ready (llguidance's matcher is not shared across threads).

    `stop_tokens` (EOS, and e.g. a chat template's end marker) are allowed exactly when the grammar
    accepts; `after_bos` says the first token follows BOS (its leading space would be dropped).
    """

    def __init__(self, grammar: Grammar, stop_tokens=(), after_bos: bool = False):
        llg = _llguidance()
        self.vocab = grammar.vocab
        self.matcher = llg.LLMatcher(self.vocab.ll, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"{grammar.spec.kind}: {_one_line(self.matcher.get_error())}")
        self.stop_tokens = np.array(sorted(set(stop_tokens) | {self.vocab.tokenizer.eos_id}), dtype=np.int64)
        self.after_bos = after_bos
        self._bits = np.zeros(self.vocab.words, dtype=np.int32)
        self.done = False  # the grammar is complete and admits nothing more: the sequence can end
        self._pending = self.vocab.pool.submit(self._compute)

    def _compute(self):  # on the mask thread; llguidance drops the GIL while it works
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def allowed(self) -> np.ndarray:
        """[vocab] bool: the tokens the grammar allows next (waits for the mask being computed)."""
        self._pending.result()
        if self.matcher.is_error():
            raise GrammarError(f"structured output: {_one_line(self.matcher.get_error())}")
        ok = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab.size].astype(bool)
        ok[self.stop_tokens] = ok[self.vocab.tokenizer.eos_id]
        if self.after_bos:
            spaced = ok & self.vocab.space_first
            ok &= ~self.vocab.space_first
            if spaced.any() and not ok.any():  # only spaced pieces fit (forced text): spell it in bytes
                ok[self.vocab.byte_ids] = [self.matcher.validate_tokens([t]) == 1 for t in self.vocab.byte_ids]
        return ok

    def mask(self, logits: np.ndarray) -> np.ndarray:  # [vocab] -> [vocab], a new array
        ok = self.allowed()
        if not ok.any():
            raise GrammarError("structured output: the grammar allows no token here")
        return np.where(ok, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def advance(self, token: int):
        """Consume a sampled (allowed) token and start on the next mask."""
        self.after_bos = False
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"structured output: token {token} was rejected: "
                               f"{_one_line(self.matcher.get_error())}")
        # read before the next mask starts: the matcher is not to be touched while it computes
        self.done = self.matcher.is_stopped() and self.matcher.is_accepting()
        if not self.done:
            self._pending = self.vocab.pool.submit(self._compute)

    def close(self):
        """Wait for a mask still being computed (call before dropping a sequence mid-way)."""
        self._pending.result()
