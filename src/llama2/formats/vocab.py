"""Vocabularies from wherever a model keeps them, and llama2.c's tokenizer.bin written from them.

Sources: a sentencepiece `.model` (parsed here from its protobuf, no sentencepiece needed), a llama2.c
`tokenizer.bin`, a Hugging Face `tokenizer.json` (BPE with byte fallback, or byte-level BPE), Meta's
tiktoken `tokenizer.model` (Llama 3), GGUF metadata (gguf.py).
`Vocab.to_bin()` follows llama2.c's tokenizer.py export byte for byte.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..fileio import atomic_write, read_user_file, read_user_text

# sentencepiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # sentencepiece's visible space


@dataclass
class Vocab:
    """A vocabulary: pieces, scores, piece types. `model` says which kind (GGUF's names):
    "llama", sentencepiece terms ("▁" for space, scores order the merges); "gpt2", byte-level BPE
    (pieces in GPT-2's byte alphabet, `merges` in order, `pre` the pre-tokenizer's llama.cpp name,
    and `source` the tokenizer.json it came from, when there is one: the reference to build from)."""
    pieces: list  # str per id
    scores: list  # float per id (higher merges first)
    types: list  # int per id (NORMAL, CONTROL, BYTE, ...)
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    model: str = "llama"
    merges: list = None  # "a b" strings, first merge first ("gpt2" only)
    pre: str = None  # "gpt2" only: a key of bytelevel.PRE_TOKENIZERS
    source: object = None  # "gpt2" only: the tokenizer.json to build the tokenizer from
    eos_ids: tuple = ()  # further ids that end a reply (eos_token_id lists, end-of-turn tokens)

    def tokenizer(self, where: str, vocab_size: int = None):
        """The tokenizer of this vocabulary (llama2.tokenizer.Tokenizer, or a
        bytelevel.ByteLevelTokenizer for "gpt2"); `where` names the file in errors."""
        if self.model == "gpt2":
            from ..bytelevel import ByteLevelTokenizer
            if self.source is not None:
                return ByteLevelTokenizer.from_json(self.source, self.bos_id, self.eos_id, vocab_size,
                                                    self.eos_ids)
            specials = [p for p, t in zip(self.pieces, self.types) if t in (CONTROL, USER_DEFINED)]
            return ByteLevelTokenizer.from_merges(self.pieces, self.merges, self.pre, specials, self.bos_id,
                                                  self.eos_id, where, vocab_size, self.eos_ids)
        from ..tokenizer import Tokenizer
        special = {p: i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t in (CONTROL, USER_DEFINED)}
        special.setdefault("<s>", self.bos_id)
        special.setdefault("</s>", self.eos_id)
        hidden = [i for i, t in enumerate(self.types) if t == CONTROL]
        return Tokenizer(self.bin_pieces(), self.scores, bos_id=self.bos_id, eos_id=self.eos_id,
                         special=special, hidden=hidden, eos_ids=self.eos_ids)

    def __len__(self):
        return len(self.pieces)

    def bin_pieces(self) -> list:
        """Pieces as llama2.c's tokenizer.bin has them: "▁" -> " ", BOS/EOS as "\\n<s>\\n"/"\\n</s>\\n"."""
        out = []
        for i, piece in enumerate(self.pieces):
            if i == self.bos_id:
                piece = "\n<s>\n"
            elif i == self.eos_id:
                piece = "\n</s>\n"
            out.append(piece.replace(SPACE, " ").encode("utf-8"))
        return out

    def to_bin(self) -> bytes:
        """llama2.c tokenizer.bin: uint32 max_token_length, then per token: float32 score,
        uint32 length, the piece's bytes."""
        pieces = self.bin_pieces()
        parts = [struct.pack("<I", max(len(p) for p in pieces))]
        for piece, score in zip(pieces, self.scores):
            parts.append(struct.pack("<fI", score, len(piece)))
            parts.append(piece)
        return b"".join(parts)


def write_bin(path, vocab: Vocab):
    if vocab.model != "llama":  # run.c's encoder merges by score over code points, not bytes
        raise FormatError(f"{path}: a byte-level BPE ({vocab.model}) vocabulary cannot be written as a "
                          "llama2.c tokenizer.bin; use the model's own tokenizer file")
    with atomic_write(path) as f:
        f.write(vocab.to_bin())


# --- sentencepiece .model: a protobuf ModelProto, read with a minimal wire-format decoder ---------

def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """Yield (field number, wire type, value) of one protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value


def _int32(v):  # protobuf int32 varints are 64-bit two's complement when negative
    return v - (1 << 64) if v >= 1 << 63 else v


def from_sentencepiece(path) -> Vocab:
    """Read a sentencepiece model file: ModelProto.pieces (1) and TrainerSpec (2) unk/bos/eos ids."""
    path = Path(path)
    buf = read_user_file(path, "sentencepiece model")
    pieces, scores, types = [], [], []
    ids = {"unk": 0, "bos": 1, "eos": 2}
    try:
        for number, wire, value in _fields(buf):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        (score,) = struct.unpack("<f", v)
                    elif n == 3 and w == 0:
                        kind = v
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 2 and wire == 2:
                for n, w, v in _fields(value):
                    if w == 0 and n in (40, 41, 42):
                        ids[{40: "unk", 41: "bos", 42: "eos"}[n]] = _int32(v)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a sentencepiece model ({e})") from None
    if not pieces:
        raise FormatError(f"{path}: not a sentencepiece model (no pieces)")
    return Vocab(pieces, scores, types, ids["bos"], ids["eos"], ids["unk"])


def _put_varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int32s as 64-bit two's complement, as protobuf writes them
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _put(number: int, value) -> bytes:  # one field: int (varint), float (fixed32), bytes/str
    if isinstance(value, float):
        return _put_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return _put_varint(number << 3 | 2) + _put_varint(len(raw)) + raw
    return _put_varint(number << 3) + _put_varint(int(value))


def to_sentencepiece(vocab: Vocab) -> bytes:
    """A sentencepiece model file of a "llama" vocabulary (what from_sentencepiece reads, and the
    sentencepiece library loads): BPE with byte fallback, a dummy prefix, no normalization rules."""
    if vocab.model != "llama":
        raise FormatError(f"a {vocab.model} vocabulary cannot be written as a sentencepiece model")
    parts = [_put(1, _put(1, p) + _put(2, float(s)) + _put(3, t))
             for p, s, t in zip(vocab.pieces, vocab.scores, vocab.types)]
    trainer = (_put(3, 2) + _put(4, len(vocab.pieces)) + _put(35, 1) + _put(40, vocab.unk_id)
               + _put(41, vocab.bos_id) + _put(42, vocab.eos_id) + _put(43, -1))  # 3: model_type BPE
    normalizer = _put(1, "identity") + _put(3, 1) + _put(4, 0) + _put(5, 1)
    return b"".join(parts) + _put(2, trainer) + _put(3, normalizer)


def to_tokenizer_json(vocab: Vocab) -> dict:
    """tokenizer.json (the `tokenizers` library's) of a "llama" vocabulary, as transformers'
    LlamaConverter builds it from a sentencepiece BPE model: the pieces, merges ranked by the score of
    the piece they make, byte fallback, a "▁" prepended and spaces as "▁"."""
    if vocab.model != "llama":
        raise FormatError(f"a {vocab.model} vocabulary has its own tokenizer.json")
    ids = {p: i for i, p in enumerate(vocab.pieces)}
    merges = []
    for piece, score in zip(vocab.pieces, vocab.scores):
        if len(piece) < 2 or vocab.types[ids[piece]] != NORMAL:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in ids and b in ids:
                merges.append((-score, ids[piece], ids[a], ids[b], a, b))
    merges.sort()  # best score first; ties by the merged piece's id, then the left part's
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, (p, t) in enumerate(zip(vocab.pieces, vocab.types)) if t in (UNKNOWN, CONTROL)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": SPACE}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": vocab.pieces[vocab.bos_id], "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": vocab.pieces[vocab.bos_id], "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": vocab.pieces[vocab.bos_id], "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {vocab.pieces[vocab.bos_id]: {
                               "id": vocab.pieces[vocab.bos_id], "ids": [vocab.bos_id],
                               "tokens": [vocab.pieces[vocab.bos_id]]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": vocab.pieces[vocab.unk_id],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": ids,
                  "merges": [[a, b] for *_, a, b in merges]},
    }


# --- llama2.c tokenizer.bin ---------------------------------------------------------------------

def from_llama2c(path, vocab_size=None) -> Vocab:
    """Read a tokenizer.bin back into sentencepiece terms (types inferred: <0xNN> bytes, BOS/EOS)."""
    path = Path(path)
    buf = read_user_file(path, "tokenizer file")
    pieces, scores, types = [], [], []
    pos = 4
    while pos < len(buf) and (vocab_size is None or len(pieces) < vocab_size):
        if pos + 8 > len(buf):
            raise FormatError(f"{path}: truncated token record at byte {pos}")
        score, n = struct.unpack_from("<fI", buf, pos)
        raw = buf[pos + 8:pos + 8 + n]
        if len(raw) != n:
            raise FormatError(f"{path}: truncated token record at byte {pos}")
        pos += 8 + n
        text = raw.decode("utf-8", errors="surrogateescape")
        if text == "\n<s>\n":
            text, kind = "<s>", CONTROL
        elif text == "\n</s>\n":
            text, kind = "</s>", CONTROL
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = BYTE
        else:
            kind = UNKNOWN if text == "<unk>" else NORMAL
        pieces.append(text.replace(" ", SPACE))
        scores.append(score)
        types.append(kind)
    if vocab_size is not None and len(pieces) < vocab_size:
        raise FormatError(f"{path}: has {len(pieces)} tokens, the model needs {vocab_size}")
    bos = pieces.index("<s>") if "<s>" in pieces else 1
    eos = pieces.index("</s>") if "</s>" in pieces else 2
    return Vocab(pieces, scores, types, bos, eos)


# --- Hugging Face tokenizer.json ----------------------------------------------------------------

def from_tokenizer_json(path, bos_id=None, eos_id=None) -> Vocab:
    """A BPE tokenizer.json (Llama style: byte fallback, "▁" spaces). Scores are minus the rank of
    the merge that makes each token, which is how a sentencepiece BPE model orders its pieces."""
    path = Path(path)
    text = read_user_text(path, "tokenizer.json")
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{path}: cannot read tokenizer.json ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise FormatError(f"{path}: only BPE tokenizer.json files are supported "
                          f"(found model type {model.get('type')!r})")
    if "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
        return _byte_level_json(path, spec, bos_id, eos_id)
    vocab = dict(model["vocab"])
    for tok in spec.get("added_tokens") or []:
        vocab[tok["content"]] = tok["id"]
    size = max(vocab.values()) + 1
    pieces = [f"<unused{i}>" for i in range(size)]
    for piece, i in vocab.items():
        pieces[i] = piece
    scores = [0.0] * size
    for rank, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(a + b)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    special = {tok["id"] for tok in spec.get("added_tokens") or [] if tok.get("special")}
    types = []
    for i, piece in enumerate(pieces):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(BYTE)
        elif piece == model.get("unk_token"):
            types.append(UNKNOWN)
        else:
            types.append(CONTROL if i in special else NORMAL)
    unk = vocab.get(model.get("unk_token"), 0)
    bos = vocab.get("<s>", 1) if bos_id is None else bos_id
    eos = vocab.get("</s>", 2) if eos_id is None else eos_id
    return Vocab(pieces, scores, types, bos, eos, unk)


def _byte_level_json(path, spec, bos_id, eos_id) -> Vocab:
    """A byte-level BPE tokenizer.json as a Vocab (tokens, merges, the pre-tokenizer's GGUF name, so
    that it can be written to GGUF); the tokenizer itself is built from the file."""
    from ..bytelevel import LLAMA3_PATTERN
    model = spec["model"]
    vocab = dict(model["vocab"])
    added = spec.get("added_tokens") or []
    for tok in added:
        vocab[tok["content"]] = tok["id"]
    pieces = [f"<unused{i}>" for i in range(max(vocab.values()) + 1)]
    for piece, i in vocab.items():
        pieces[i] = piece
    types = [NORMAL] * len(pieces)
    for tok in added:
        types[tok["id"]] = CONTROL if tok.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = json.dumps(spec.get("pre_tokenizer"))
    name = ("llama-bpe" if json.dumps(LLAMA3_PATTERN)[1:-1] in pre else
            "smollm" if '"Digits"' in pre else "gpt-2")

    def named(ids, *names):
        return ids if ids is not None else next((vocab[n] for n in names if n in vocab), 0)
    return Vocab(pieces, [0.0] * len(pieces), types, named(bos_id, "<|begin_of_text|>", "<s>", "<|endoftext|>"),
                 named(eos_id, "<|end_of_text|>", "</s>", "<|endoftext|>"), 0, model="gpt2", merges=merges,
                 pre=name, source=path)


def from_tiktoken(path) -> Vocab:
    """Meta's Llama 3 tiktoken tokenizer.model as a Vocab (pieces in GPT-2's byte alphabet, merges
    derived from the ranks, Meta's special tokens after them)."""
    from ..bytelevel import LLAMA3_SPECIAL_COUNT, LLAMA3_SPECIALS, byte_alphabet, merges_of, read_tiktoken
    ranks = read_tiktoken(path)
    alphabet = byte_alphabet()
    pieces = ["".join(alphabet[b] for b in t) for t in ranks]
    specials = list(LLAMA3_SPECIALS) + [f"<|reserved_special_token_{2 + i}|>"
                                        for i in range(LLAMA3_SPECIAL_COUNT - len(LLAMA3_SPECIALS))]
    n = len(pieces)
    merges = [f"{a} {b}" for a, b in merges_of(ranks)]
    return Vocab(pieces + specials, [0.0] * (n + len(specials)), [NORMAL] * n + [CONTROL] * len(specials),
                 n, n + 1, 0, model="gpt2", merges=merges, pre="llama-bpe",
                 eos_ids=(n + LLAMA3_SPECIALS.index("<|eot_id|>"), n + LLAMA3_SPECIALS.index("<|eom_id|>")))


def load_vocab(path, vocab_size=None) -> Vocab:
    """Any tokenizer file: sentencepiece .model, tokenizer.json, tiktoken tokenizer.model or llama2.c
    tokenizer.bin, told apart by content (JSON text, "base64 rank" lines, protobuf pieces, or a
    llama2.c header)."""
    path = Path(path)
    head = read_user_file(path, "tokenizer file", 64, exact=False)
    if head.lstrip()[:1] == b"{":
        return from_tokenizer_json(path)
    from ..bytelevel import is_tiktoken
    if is_tiktoken(head):
        return from_tiktoken(path)
    # protobuf field 1, length-delimited (ModelProto.pieces), whose message starts with a tag;
    # a tokenizer.bin starts with a small uint32 max_token_length, so bytes 2-3 are zero there
    if head[:1] == b"\x0a" and head[2:4] != b"\0\0":
        return from_sentencepiece(path)
    return from_llama2c(path, vocab_size)
