"""`llama2 tokenizer export`: tokenizer.bin byte-identical to llama2.c's tokenizer.py, from a
sentencepiece model (incl. a Code Llama-style 32016-token one), tokenizer.json and GGUF metadata."""

import io
import json
import struct

import pytest

from conftest import asset
from llama2.cli import main
from llama2.formats.vocab import NORMAL, USER_DEFINED, from_sentencepiece, load_vocab
from llama2.tokenizer import Tokenizer

# ids 32000-32015, with Code Llama's infilling pieces at 32007-32010
CODE_LLAMA_EXTRA = [f"\u2581<extra_{i}>" for i in range(7)] + \
    ["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"] + [f"\u2581<extra_{i}>" for i in range(7, 12)]


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    return main(argv, stdout=out, stderr=err, stdin=io.StringIO("")), err.getvalue()


def llama2c_export(model_path) -> bytes:
    """llama2.c's tokenizer.py export, run through the sentencepiece library: the reference."""
    spm = pytest.importorskip("sentencepiece", reason="the reference export needs sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        t = sp.id_to_piece(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        tokens.append(t.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    out = struct.pack("I", max(len(t) for t in tokens))
    for t, s in zip(tokens, scores):
        out += struct.pack("fI", s, len(t)) + t
    return out


@pytest.mark.parametrize("model,expected", [("tok512.model", "tok512.bin"),
                                            ("tokenizer.model", "tokenizer.bin")])
def test_export_is_byte_identical(tmp_path, model, expected):
    src = tmp_path / model
    src.write_bytes(asset(model).read_bytes())
    code, err = run_cli(["tokenizer", "export", str(src)])  # default output: the .bin beside it
    assert code == 0, err
    assert src.with_suffix(".bin").read_bytes() == asset(expected).read_bytes()


def _piece(text, score, kind) -> bytes:
    """A protobuf SentencePiece message (piece=1, score=2, type=3) as ModelProto field 1."""
    raw = text.encode()
    body = b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + bytes([kind])
    return b"\x0a" + bytes([len(body)]) + body


def test_code_llama_vocabulary(tmp_path):
    """Code Llama's tokenizer is Llama's plus 16 user-defined pieces: 32016 tokens."""
    model = tmp_path / "codellama.model"
    model.write_bytes(asset("tokenizer.model").read_bytes() +
                      b"".join(_piece(p, 0.0, USER_DEFINED) for p in CODE_LLAMA_EXTRA))
    vocab = from_sentencepiece(model)
    assert len(vocab) == 32016 and vocab.pieces[32008] == "\u2581<SUF>"
    out = tmp_path / "codellama.bin"
    assert run_cli(["tokenizer", "export", str(model), "-o", str(out)])[0] == 0
    tok = Tokenizer.load(out, vocab_size=32016)
    assert tok.pieces[32007:32011] == [b" <PRE>", b" <SUF>", b" <MID>", b" <EOT>"]
    assert out.read_bytes() == llama2c_export(model)


def test_tokenizer_json_encodes_like_the_sentencepiece_model(tmp_path):
    """A Llama-style tokenizer.json (BPE, byte fallback, merges in priority order) made from tok512:
    the vocabulary we read from it encodes every text as tok512.bin does."""
    ref = from_sentencepiece(asset("tok512.model"))
    index = {p: i for i, p in enumerate(ref.pieces)}
    merges = []
    for i in sorted(range(len(ref)), key=lambda i: -ref.scores[i]):
        piece = ref.pieces[i]
        if ref.types[i] != NORMAL or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in index and piece[k:] in index]
        merges.append(" ".join(splits[0]))
    spec = {"added_tokens": [{"id": i, "content": ref.pieces[i], "special": True} for i in (0, 1, 2)],
            "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                      "vocab": {p: i for i, p in enumerate(ref.pieces)}, "merges": merges}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    vocab = load_vocab(path)
    assert vocab.pieces == ref.pieces and vocab.types == ref.types
    ours = Tokenizer(vocab.bin_pieces(), vocab.scores)
    theirs = Tokenizer.load(asset("tok512.bin"))
    for text in ["Once upon a time, there was a little girl named Lily.", "héllo wörld ☃ 123\n\tx",
                 "The quick brown fox jumps over the lazy dog"]:
        assert ours.encode(text) == theirs.encode(text)
    out = tmp_path / "from_json.bin"
    assert run_cli(["tokenizer", "export", str(path), "-o", str(out)])[0] == 0
    assert Tokenizer.load(out).pieces == theirs.pieces


def test_tokenizer_from_gguf(tmp_path):
    out = tmp_path / "tok.bin"
    assert run_cli(["tokenizer", "export", str(asset("stories260K.gguf")), "-o", str(out)])[0] == 0
    assert out.read_bytes() == asset("tok512.bin").read_bytes()


def test_llama2c_bin_reads_back(tmp_path):
    vocab = load_vocab(asset("tokenizer.bin"))
    assert vocab.to_bin() == asset("tokenizer.bin").read_bytes()
    assert vocab.pieces == from_sentencepiece(asset("tokenizer.model")).pieces


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\xff\xff\xff")  # a protobuf field whose length runs past the end
    out = tmp_path / "bad.bin"
    code, err = run_cli(["tokenizer", "export", str(bad)])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err and not out.exists()


def test_gguf_needs_an_output_name(tmp_path):
    code, err = run_cli(["tokenizer", "export", str(asset("stories260K.gguf"))])
    assert code == 2 and "-o OUT" in err and err.count("\n") == 1


def test_tokenizer_bin_whose_first_byte_looks_like_protobuf(tmp_path):
    """max_token_length 10 makes a tokenizer.bin start with 0x0a, as a sentencepiece model does."""
    tok = Tokenizer([b"<unk>", b"\n<s>\n", b"\n</s>\n", b"abcdefghij"], [0.0, 0.0, 0.0, -1.0])
    path = tmp_path / "tok.bin"
    tok.save(path)
    assert path.read_bytes()[:1] == b"\x0a"
    vocab = load_vocab(path)
    assert vocab.to_bin() == path.read_bytes() and (vocab.bos_id, vocab.eos_id) == (1, 2)


def test_byte_level_tokenizer_json_cannot_become_tokenizer_bin(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"pre_tokenizer": {"type": "ByteLevel"},
                                "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    code, err = run_cli(["tokenizer", "export", str(path)])
    assert code == 1 and "byte-level" in err and err.count("\n") == 1


def test_model_directory(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(asset("tok512.model").read_bytes())
    assert run_cli(["tokenizer", "export", str(tmp_path)])[0] == 0
    assert (tmp_path / "tokenizer.bin").read_bytes() == asset("tok512.bin").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(["tokenizer", "export", str(empty)])
    assert code == 1 and "no tokenizer.model" in err
