"""The llama2.c tokenizer (`tokenizer.bin`): BPE encode, decode and streaming text, as run.c does them.

File format (llama2.c tokenizer.py export): uint32 max_token_length, then per token float32 score,
int32 byte length, bytes. Encoding follows run.c's `encode` exactly (dummy prefix, code-point lookup,
byte fallback +3, greedy merge of the best-scoring adjacent pair, leftmost on ties).
"""

import heapq
import re
import struct
from pathlib import Path

from .errors import FormatError
from .fileio import MAX_TEXT_BYTES, atomic_write, read_user_file

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")
# C's isprint / isspace in the "C" locale, for run.c's safe_printf.
_PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\v\f\r ")
# Special tokens that end an assistant's turn wherever a vocabulary has them (llama.cpp treats the
# same texts as end-of-generation): Llama 3's, ChatML's, Phi's, Gemma's, GPT-2's, Code Llama's infill.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<EOT>")


def special_ids_of(special: dict) -> set:
    """The ids of the END_OF_TURN texts among `special` (text -> id)."""
    return {special[t] for t in END_OF_TURN if t in special}


def split_special(text: str, special: dict) -> list:
    """`text` cut at every occurrence of a key of `special` (text -> id), longest first: a list of
    ids (the special tokens) and strings (the text between them, never empty)."""
    if not special:
        return [text] if text else []
    pattern = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True))))
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(special[m.group()])
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


class Tokenizer:
    """A vocabulary of byte pieces with merge scores. Ids are positions in the vocabulary.

    `special` (text -> id): the control tokens a chat template may spell (default BOS and EOS as
    "<s>" and "</s>"), parsed only by `encode(..., special=True)`; `hidden` ids decode to nothing
    (a model's control tokens); `eos_ids` end a reply besides BOS and EOS (run.c stops at both)."""

    space_after_bos_dropped = True  # run.c's decode: a piece's leading space goes right after BOS

    def __init__(self, pieces, scores, max_token_length=None, bos_id=1, eos_id=2, special=None,
                 hidden=(), eos_ids=()):
        if len(pieces) != len(scores):
            raise ValueError("pieces and scores differ in length")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(s) for s in scores]
        self.max_token_length = max_token_length or max((len(p) for p in self.pieces), default=0)
        self.bos_id, self.eos_id = bos_id, eos_id
        # run.c looks pieces up as C strings with bsearch over a sorted copy; for duplicate pieces
        # the first id wins here (real vocabularies have none).
        self._ids = {}
        for i, p in enumerate(self.pieces):
            self._ids.setdefault(p.split(b"\0", 1)[0], i)
        self._decoded = [self._piece_bytes(p) for p in self.pieces]
        for i in hidden:
            self._decoded[i] = b""
        self.special = dict(special) if special is not None else {"<s>": bos_id, "</s>": eos_id}
        self.end_ids = frozenset({bos_id, eos_id, *eos_ids} | special_ids_of(self.special))

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @classmethod
    def load(cls, path, vocab_size=None) -> "Tokenizer":
        """Read a llama2.c tokenizer.bin. With `vocab_size`, take exactly that many entries (as run.c
        does) and fail if the file has fewer."""
        path = Path(path)
        head = read_user_file(path, "tokenizer file", 4, exact=False)
        if len(head) < 4:
            raise FormatError(f"{path}: too short to be a tokenizer.bin ({len(head)} bytes)")
        (max_len,) = struct.unpack_from("<I", head, 0)
        if max_len == 0:  # every token would be empty: not a tokenizer (a file of zeros, say)
            raise FormatError(f"{path}: max_token_length at byte 0 is 0; not a tokenizer.bin")
        # read no more than the header allows for `vocab_size` tokens (run.c ignores the rest)
        bound = MAX_TEXT_BYTES if vocab_size is None else min(MAX_TEXT_BYTES, 4 + vocab_size * (8 + max_len))
        data = read_user_file(path, "tokenizer file", bound, exact=vocab_size is None)
        off, pieces, scores = 4, [], []
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if off + 8 > len(data):
                raise FormatError(f"{path}: truncated token entry {len(pieces)} at byte {off}")
            score, n = struct.unpack_from("<fi", data, off)
            if n < 0 or n > max_len or off + 8 + n > len(data):
                raise FormatError(f"{path}: token {len(pieces)} at byte {off} has a bad length {n} "
                                  f"(max_token_length is {max_len})")
            pieces.append(data[off + 8: off + 8 + n])
            scores.append(score)
            off += 8 + n
        if vocab_size is not None and len(pieces) < vocab_size:
            raise FormatError(f"{path}: tokenizer has {len(pieces)} tokens but the model's vocabulary "
                              f"has {vocab_size}; use the tokenizer the model was trained with (-z)")
        if not pieces:
            raise FormatError(f"{path}: tokenizer has no tokens")
        return cls(pieces, scores, max_len)

    def save(self, path):
        with atomic_write(path) as f:
            f.write(struct.pack("<I", self.max_token_length))
            for piece, score in zip(self.pieces, self.scores):
                f.write(struct.pack("<fi", score, len(piece)))
                f.write(piece)

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False, prefix_space: bool = True,
               special: bool = False) -> list:
        """run.c's encode(): BPE over UTF-8 code points with byte fallback. `prefix_space=False`
        leaves out sentencepiece's dummy-prefix space (text that continues other text). `special`
        (chat templates only): the texts of `self.special` become their ids and the text between
        them is encoded piece by piece, each with its dummy prefix (as sentencepiece encodes the
        segments between special tokens)."""
        if special:
            tokens = [self.bos_id] if bos else []
            for part in split_special(text, self.special):
                tokens.extend([part] if isinstance(part, int) else self.encode(part, bos=False))
            return tokens + ([self.eos_id] if eos else [])
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        data = data.split(b"\0", 1)[0]  # run.c reads the text as a C string
        ids = self._ids
        tokens = [self.bos_id] if bos else []
        if data and prefix_space:
            tokens.append(ids.get(b" ", -1))  # the dummy-prefix space
        # One token per code point (run.c groups a lead byte with up to 3 continuation bytes).
        i, n = 0, len(data)
        while i < n:
            j = i + 1
            while j < n and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            tid = ids.get(data[i:j], -1)
            if tid != -1:
                tokens.append(tid)
            else:
                tokens.extend(b + 3 for b in data[i:j])
            i = j
        self._merge(tokens)
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def _merge(self, tokens):
        """Repeatedly merge the adjacent pair whose merged piece scores highest, leftmost on ties,
        until no pair is in the vocabulary: run.c's loop, with a heap instead of a rescan per merge
        (O(n log n), so long texts encode quickly). Tokens form a linked list; heap entries are
        (-score, position of the left token, left token, right token) and stale ones are skipped."""
        pieces, scores, ids = self.pieces, self.scores, self._ids
        n = len(tokens)
        if n < 2:
            return tokens
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < n:
                pid = ids.get(pieces[tokens[i]] + pieces[tokens[j]], -1)
                if pid != -1 and scores[pid] > -1e10:  # run.c's initial best_score
                    heap.append((-scores[pid], i, tokens[i], tokens[j], pid))

        for i in range(n - 1):
            push(i)
        heapq.heapify(heap)
        while heap:
            _, i, left, right, pid = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or tokens[i] != left or tokens[j] != right:
                continue  # stale: one side was merged away or changed since this entry was made
            tokens[i] = pid
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for k in (prv[i], i):
                if k >= 0 and nxt[k] < n:
                    pair = ids.get(pieces[tokens[k]] + pieces[tokens[nxt[k]]], -1)
                    if pair != -1 and scores[pair] > -1e10:
                        heapq.heappush(heap, (-scores[pair], k, tokens[k], tokens[nxt[k]], pair))
        tokens[:] = [t for t, keep in zip(tokens, alive) if keep]
        return tokens

    # -- decoding ---------------------------------------------------------------------------------

    @staticmethod
    def _piece_bytes(piece: bytes) -> bytes:
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.split(b"\0", 1)[0]  # printed with %s: stops at a NUL

    def piece(self, prev_token: int, token: int) -> bytes:
        """run.c's decode(): the bytes of `token` given the previous token (BOS strips a space)."""
        raw = self.pieces[token]
        if prev_token == self.bos_id and raw[:1] == b" ":
            raw = raw[1:]
            return self._piece_bytes(raw)
        return self._decoded[token]

    def printable(self, prev_token: int, token: int) -> bytes:
        """The bytes run.c's safe_printf prints for `token`: a lone unprintable byte prints nothing."""
        b = self.piece(prev_token, token)
        if len(b) == 1 and b[0] not in _PRINTABLE:
            return b""
        return b

    def decode_bytes(self, ids, prev_token=None) -> bytes:
        """The bytes run.c would print for `ids` (each decoded after its predecessor)."""
        out = []
        prev = self.bos_id if prev_token is None else prev_token
        for t in ids:
            if t == self.bos_id:
                prev = t
                continue
            out.append(self.printable(prev, t))
            prev = t
        return b"".join(out)

    def decode(self, ids) -> str:
        """Text of `ids` as run.c prints it; a trailing incomplete UTF-8 sequence is replaced."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns a stream of tokens into text pieces that never split a UTF-8 character.

    `push(prev, token)` returns the bytes run.c would print for this token (`raw`, its safe_printf
    rules applied: a lone byte token of a multi-byte character prints nothing) and the text that is
    complete so far (`text`, where byte tokens are reassembled into their characters); `flush()`
    returns what is left when the stream ends.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._pending = b""

    def push(self, prev_token: int, token: int) -> tuple:
        raw = self.tokenizer.printable(prev_token, token)
        data = self._pending + self.tokenizer.piece(prev_token, token)
        cut = _complete_prefix(data)
        self._pending = data[cut:]
        return raw, data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        if b & 0x80 == 0:
            return n
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n if back >= need else n - back
    return n
