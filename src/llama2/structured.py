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
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import Llama2Error

KINDS = ("json_schema", "json_object", "regex", "grammar")  # grammar: Lark or GBNF
# JSON as OpenAI writes it: no free whitespace between tokens (a sampled model would otherwise
# wander off into spaces and newlines), ", " and ": " as separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# llguidance's own bounds on a grammar and on each step (its LLParserLimits; these are its defaults,
# written down so docs/server.md can state them): symbols in the grammar, lexer states (1-2 kB
# each), "fuel" for building the lexer (~50k/ms) and for one mask (~14k/ms), Earley items per
# step and per row. verbose_errors off: an error is one line, without the parser's state.
LIMITS = {"max_grammar_size": 500_000, "max_lexer_states": 250_000, "initial_lexer_fuel": 1_000_000,
          "step_lexer_fuel": 200_000, "step_max_items": 50_000, "max_items_in_row": 2000}
# An object with N optional properties puts about 4N + 7 items in one Earley row as soon as a key
# starts (measured with llguidance 1.9), beyond max_items_in_row past ~498; refused at compile
# time rather than failing mid-answer. Required properties come in order and cost no such row.
MAX_OPTIONAL_PROPERTIES = (LIMITS["max_items_in_row"] - 8) // 4
MAX_SCHEMA_DEPTH = 64  # arrays and objects nested in a schema, given as an object or as JSON text
# The compiled-grammar cache, per vocabulary: a kept grammar holds its first matcher (copied for each
# request, as building one can take seconds), measured (RSS, llguidance 1.9, 512- and 32000-token
# vocabularies) at ~150 KiB plus ~75 bytes per byte of grammar text; counted as a bit more.
CACHE_BYTES = 128 << 20
CACHE_ENTRIES = 256
ENTRY_BYTES, TEXT_FACTOR = 160 << 10, 80


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
        self.grammars = GrammarCache()

    @classmethod
    def of(cls, tokenizer, vocab_size: int = None) -> "Vocabulary":
        with cls._lock:
            vocab = cls._cache.get(tokenizer)
            if vocab is None or (vocab_size and vocab.size != vocab_size):
                vocab = cls._cache[tokenizer] = cls(tokenizer, vocab_size)
            return vocab


class GrammarCache:
    """Compiled grammars (and the errors of those that failed) by their spec, least recently used
    first out, at most `max_entries` and `max_bytes` of memory (as `cost` estimates it). Two
    threads asking for the same spec at once compile it once."""

    def __init__(self, max_bytes: int = CACHE_BYTES, max_entries: int = CACHE_ENTRIES):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.bytes = 0
        self._done = OrderedDict()  # key -> (Grammar or GrammarError, cost)
        self._building = {}  # key -> Future of (Grammar or GrammarError)
        self._lock = threading.Lock()

    @staticmethod
    def key(spec: "Spec") -> tuple:
        source = spec.source
        if not isinstance(source, str):
            source = json.dumps(source, sort_keys=True, separators=(",", ":"))
        return spec.kind, spec.strict, source

    @staticmethod
    def cost(key: tuple, result) -> int:
        """Estimated bytes an entry holds: its key, and a grammar's matcher or an error's text."""
        if isinstance(result, Grammar):
            return len(key[2]) + ENTRY_BYTES + TEXT_FACTOR * len(result.text)
        return len(key[2]) + len(str(result))

    def get(self, spec: "Spec", build) -> "Grammar":
        """The compiled grammar of `spec`, from `build(spec)` unless cached; raises its GrammarError."""
        key = self.key(spec)
        with self._lock:
            hit = self._done.get(key)
            if hit is not None:
                self._done.move_to_end(key)
            else:
                waiting = self._building.get(key)
                if waiting is None:
                    mine = self._building[key] = Future()
        if hit is not None:
            return self._unwrap(hit[0])
        if waiting is not None:
            return self._unwrap(waiting.result())
        try:
            result = build(spec)
        except GrammarError as e:
            result = e
        except BaseException as e:  # not a verdict on the spec: not cached; the waiters get it too
            with self._lock:
                del self._building[key]
            mine.set_exception(e)
            raise
        cost = self.cost(key, result)
        with self._lock:
            del self._building[key]
            self._done[key] = (result, cost)
            self.bytes += cost
            while self._done and (self.bytes > self.max_bytes or len(self._done) > self.max_entries):
                self.bytes -= self._done.popitem(last=False)[1][1]
        mine.set_result(result)
        return self._unwrap(result)

    @staticmethod
    def _unwrap(result):
        if isinstance(result, GrammarError):
            raise GrammarError(str(result))
        return result


def depth(value) -> int:
    """Nesting depth of arrays and objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def read_schema(value):
    """A JSON schema given as an object (or true/false) or as JSON text -> the object, at most
    MAX_SCHEMA_DEPTH deep either way (nothing downstream then recurses without bound); GrammarError
    saying what is wrong otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise GrammarError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
        except ValueError as e:
            raise GrammarError(f"not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, (dict, bool)):
        raise GrammarError(f"expected a JSON schema object, got {type(value).__name__}")
    if depth(value) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    return value


def _pointer(root, ref: str):
    """The subschema a local `$ref` ("#", "#/$defs/a") points at, or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _check_schema(schema):
    """What llguidance would accept but then fail on mid-answer, refused now: a recursive `$ref`
    (the matcher runs out of items, or has no way to end, once the model nests deep enough) and
    an object with more than MAX_OPTIONAL_PROPERTIES optional properties. Walks without recursion."""
    refs_of = {}  # local $ref -> the local $refs anywhere inside what it points at

    def refs_inside(node) -> set:
        found, stack = set(), [node]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                ref = v.get("$ref")
                if isinstance(ref, str) and _pointer(schema, ref) is not None:
                    found.add(ref)
                props = v.get("properties")
                if isinstance(props, dict):
                    required = v.get("required") if isinstance(v.get("required"), list) else []
                    optional = len(props.keys() - {r for r in required if isinstance(r, str)})
                    if optional > MAX_OPTIONAL_PROPERTIES:
                        raise GrammarError(f"json_schema: an object with {optional} optional properties; "
                                           f"at most {MAX_OPTIONAL_PROPERTIES} (make some required)")
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
        return found

    # depth-first over the $ref graph from the root: a $ref met again on the current path is a cycle
    refs_of["#"] = refs_inside(schema)
    path, on_path, finished = [("#", iter(refs_of["#"]))], {"#"}, set()
    while path:
        ref, todo = path[-1]
        nxt = next(todo, None)
        if nxt is None:
            path.pop()
            on_path.discard(ref)
            finished.add(ref)
            continue
        if nxt in on_path:
            raise GrammarError(f"json_schema: recursive $ref {nxt!r} is not supported")
        if nxt in finished:
            continue
        if nxt not in refs_of:
            refs_of[nxt] = refs_inside(_pointer(schema, nxt))
        path.append((nxt, iter(refs_of[nxt])))
        on_path.add(nxt)


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
        try:
            schema = read_schema(spec.source)
        except GrammarError as e:
            raise GrammarError(f"json_schema: {e}") from None
        _check_schema(schema)
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


def limits():
    """LIMITS as llguidance's LLParserLimits."""
    return _llguidance().LLParserLimits(**LIMITS, verbose_errors=False)


class Grammar:
    """A compiled, checked grammar for one vocabulary; `constraint()` starts a fresh matcher.

    Compiling builds a first matcher and its first mask, so what llguidance refuses at the start
    (a grammar past its limits, one that cannot end) is a GrammarError here rather than mid-answer;
    each constraint is a copy of that matcher (building one can take seconds: 10,000 properties)."""

    def __init__(self, spec: Spec, vocab: Vocabulary):
        llg = _llguidance()
        self.spec, self.vocab = spec, vocab
        self.text = grammar_text(spec)
        bounds = limits()
        error = llg.LLMatcher.validate_grammar(self.text, vocab.ll, limits=bounds)
        if error:
            raise GrammarError(f"{spec.kind}: {_one_line(error)}")
        self._matcher = llg.LLMatcher(vocab.ll, self.text, log_level=0, limits=bounds)
        if not self._matcher.is_error():
            bits = np.zeros(vocab.words, dtype=np.int32)
            self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if self._matcher.is_error():
            raise GrammarError(f"{spec.kind}: {_one_line(self._matcher.get_error())}")
        self._lock = threading.Lock()  # the first matcher is copied, never advanced

    @classmethod
    def compile(cls, spec: Spec, tokenizer, vocab_size: int = None) -> "Grammar":
        """`spec` compiled for the tokenizer's vocabulary (cached: Vocabulary.grammars)."""
        vocab = Vocabulary.of(tokenizer, vocab_size)
        return vocab.grammars.get(spec, lambda spec: cls(spec, vocab))

    def matcher(self):
        """A fresh matcher at the grammar's start."""
        with self._lock:
            return self._matcher.deep_copy()

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
        self.vocab = grammar.vocab
        self.matcher = grammar.matcher()
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
