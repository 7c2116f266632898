"""Byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM, Mistral-Nemo), run by the `tokenizers`
library, which is the reference for them; built from a tokenizer.json, from GGUF metadata (tokens,
merges and the pre-tokenizer `tokenizer.ggml.pre` names, as llama.cpp's llama-vocab.cpp lists them)
or from Meta's tiktoken `tokenizer.model` (Llama 3).

The interface is llama2.tokenizer.Tokenizer's (encode, decode, piece, printable, pieces), so the
generation loop, the stream decoder and the chat templates use either. Special tokens are parsed
only where the caller asks (`encode(..., special=True)`, chat templates), never in user text.
"""

import base64
from pathlib import Path

from .errors import FormatError
from .tokenizer import special_ids_of, split_special

# The pre-tokenizer regexes, as the tokenizer.json files of these models give them.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF tokenizer.ggml.pre -> (how words are split, whether a word found whole in the vocabulary skips
# the merges). "gpt2": GPT-2's own ByteLevel regex; "digits": each digit alone, then GPT-2's regex
# (SmolLM); anything else is a regex. llama.cpp's list for Llama-architecture files.
PRE_TOKENIZERS = {
    "default": ("gpt2", False),
    "gpt-2": ("gpt2", False),
    "llama-bpe": (LLAMA3_PATTERN, True),
    "llama3": (LLAMA3_PATTERN, True),
    "smaug-bpe": (LLAMA3_PATTERN, False),
    "smollm": ("digits", False),
    "tekken": (TEKKEN_PATTERN, False),
    "pixtral": (TEKKEN_PATTERN, False),
}

# Meta's Llama 3 tiktoken file: 128000 ranks, then these specials and reserved ones up to 256
# (llama_models/llama3/tokenizer.py).
LLAMA3_RANKS = 128000
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>")
LLAMA3_SPECIAL_COUNT = 256


def byte_alphabet() -> dict:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    others (controls, space, 0x7F-0xA0, 0xAD) take 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_BYTE = {c: b for b, c in byte_alphabet().items()}


# str.translate's table for piece_bytes: each alphabet character to its byte's code point; the code
# points under 256 outside the alphabet to one that latin-1 cannot encode, so that a token holding
# one takes the slow path (its UTF-8 bytes differ from its latin-1 byte)
_TO_BYTE = {**{b: 0xFFFF for b in range(256)}, **{ord(c): b for c, b in _CHAR_BYTE.items()}}


def piece_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for (characters outside the alphabet as UTF-8)."""
    try:  # every character in the alphabet (a vocabulary's pieces but its special tokens): C speed
        return token.translate(_TO_BYTE).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(bytes([_CHAR_BYTE[c]]) if c in _CHAR_BYTE else c.encode("utf-8") for c in token)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise FormatError("byte-level BPE tokenizers need the `tokenizers` package "
                          "(pip install tokenizers: a dependency of llama2)") from None
    return tokenizers


def _clean(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) become U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ByteLevelTokenizer:
    """A byte-level BPE vocabulary: ids are the `tokenizers` Tokenizer's. `special` (text -> id) are
    the control tokens; they decode to nothing and are parsed only when asked."""

    space_after_bos_dropped = False  # a piece is its bytes, wherever it comes

    def __init__(self, tok, bos_id: int, eos_id: int, vocab_size: int = None, eos_ids=()):
        size = max(tok.get_vocab_size(with_added_tokens=True), vocab_size or 0)
        added = tok.get_added_tokens_decoder()  # id -> AddedToken
        self.special = {t.content: i for i, t in added.items() if t.special}
        pieces = []
        for i in range(size):
            token = tok.id_to_token(i)
            if token is None:
                pieces.append(b"")
            elif i in added:
                pieces.append(token.encode("utf-8"))
            else:
                pieces.append(piece_bytes(token))
        self.pieces = pieces
        self._decoded = [b"" if i in added and added[i].special else p for i, p in enumerate(pieces)]
        self.bos_id, self.eos_id = bos_id, eos_id
        self.end_ids = frozenset({eos_id, *eos_ids} | special_ids_of(self.special))
        # the text between special tokens never parses them (set once: it is state of the object)
        tok.encode_special_tokens = True
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # -- sources ----------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, path, bos_id=None, eos_id=None, vocab_size=None, eos_ids=()):
        tk = _tokenizers()
        try:
            tok = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            raise FormatError(f"{path}: cannot read tokenizer.json ({e})") from None
        return cls(tok, _id(tok, bos_id, ("<|begin_of_text|>", "<s>", "<|endoftext|>")),
                   _id(tok, eos_id, ("<|end_of_text|>", "</s>", "<|endoftext|>")), vocab_size, eos_ids)

    @classmethod
    def from_merges(cls, pieces, merges, pre: str, specials, bos_id: int, eos_id: int, where: str,
                    vocab_size=None, eos_ids=()):
        """From byte-level pieces, merges and a pre-tokenizer name (GGUF's); `specials` are the
        pieces that are special tokens. `where` names the file in errors."""
        if pre not in PRE_TOKENIZERS:
            raise FormatError(f"{where}: pre-tokenizer {pre!r} is not supported (expected one of "
                              f"{', '.join(PRE_TOKENIZERS)})")
        return cls(build(pieces, merges, pre, specials), bos_id, eos_id, vocab_size, eos_ids)

    # -- encoding and decoding --------------------------------------------------------------------

    def encode(self, text, bos: bool = True, eos: bool = False, prefix_space: bool = True,
               special: bool = False) -> list:
        """Ids of `text` (str or UTF-8 bytes). `special`: the texts of `self.special` become their
        ids (templates only; as `tokenizers` splits added tokens off before pre-tokenizing).
        `prefix_space` is sentencepiece's and means nothing here."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        text = _clean(text)
        parts = split_special(text, self.special) if special else [text] if text else []
        ids = []
        for part in parts:
            ids.extend([part] if isinstance(part, int) else
                       self._tok.encode(part, add_special_tokens=False).ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def piece(self, prev_token: int, token: int) -> bytes:
        """The bytes `token` stands for (nothing for special tokens)."""
        return self._decoded[token]

    printable = piece

    def decode_bytes(self, ids, prev_token=None) -> bytes:
        return b"".join(self._decoded[t] for t in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _id(tok, given, names):
    if given is not None:
        return int(given)
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return 0


def build(pieces, merges, pre: str, specials=()):
    """A `tokenizers` Tokenizer from byte-level pieces (id order), merges ("a b" strings or pairs,
    first merges first) and a PRE_TOKENIZERS name; `specials` are added as special tokens."""
    tk = _tokenizers()
    split, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {p: i for i, p in enumerate(pieces)}  # specials too: added tokens keep ids in the vocab
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    model = tk.models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    tok = tk.Tokenizer(model)
    P = tk.pre_tokenizers
    if split == "gpt2":
        tok.pre_tokenizer = P.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = P.Sequence([P.Digits(individual_digits=True),
                                        P.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = P.Sequence([P.Split(tk.Regex(split), behavior="isolated"),
                                        P.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def read_tiktoken(path) -> list:
    """A tiktoken BPE file as token bytes in rank order (ranks must be 0, 1, 2, ...)."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise FormatError(f"{path}: cannot read tokenizer ({e.strerror})") from None
    tokens = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:
            raise FormatError(f"{path}: line {n}: expected a base64 token and its rank") from None
        if rank != len(tokens):
            raise FormatError(f"{path}: line {n}: rank {rank}, expected {len(tokens)}")
        tokens.append(token)
    return tokens


def is_tiktoken(head: bytes) -> bool:
    """Whether a file's first bytes look like a tiktoken BPE file ("base64 rank" lines)."""
    first = head.split(b"\n", 1)[0].split(b" ")
    return (len(first) == 2 and first[1].strip().isdigit() and first[0]
            and all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for c in first[0]))


def merges_of(ranks: list) -> list:
    """tiktoken ranks as BPE merges. tiktoken merges the adjacent pair whose joined bytes have the
    lowest rank, so every split of a token into two tokens is a merge at that token's rank (ties
    among one token's splits by the left, then right part's rank)."""
    rank = {t: r for r, t in enumerate(ranks)}
    alphabet = byte_alphabet()
    text = ["".join(alphabet[b] for b in t) for t in ranks]
    merges = []
    for r, token in enumerate(ranks):
        splits = [(rank[token[:k]], rank[token[k:]]) for k in range(1, len(token))
                  if token[:k] in rank and token[k:] in rank]
        merges.extend((text[a], text[b]) for a, b in sorted(splits))
    return merges
