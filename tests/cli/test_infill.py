"""Fill in the middle (Code Llama): prompt ids against Meta's layout (sentencepiece) and transformers'
CodeLlamaTokenizer on the Llama 2 vocabulary extended with Code Llama's four FIM pieces;
`llama2 run --mode infill`, `create_completion(suffix=...)` and /v1/completions' `suffix`; and the
one-line refusal for models without those tokens."""

import io
import struct

import numpy as np
import pytest

from conftest import asset, random_weights
from llama2 import Llama, infill
from llama2.cli import main
from llama2.completions import RequestError
from llama2.config import ModelConfig
from llama2.formats import llama2c
from llama2.formats.vocab import from_sentencepiece
from llama2.generate import Sequence
from llama2.server import protocol
from llama2.tokenizer import StreamDecoder, Tokenizer

USER_DEFINED = 4  # sentencepiece ModelProto.SentencePiece.Type
FIM = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]  # ids 32000.. here (Code Llama's are 32007..)


def _varint(n):
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _field(number, wire, payload):
    return _varint(number << 3 | wire) + payload


def code_llama_sentencepiece(tmp_path):
    """The Llama 2 sentencepiece model with Code Llama's FIM pieces appended as user-defined
    pieces (ModelProto field 1 repeated: appending entries extends the list)."""
    buf = asset("tokenizer.model").read_bytes()
    for piece in FIM:
        raw = piece.encode()
        body = (_field(1, 2, _varint(len(raw)) + raw) + _field(2, 5, struct.pack("<f", 0.0))
                + _field(3, 0, _varint(USER_DEFINED)))
        buf += _field(1, 2, _varint(len(body)) + body)
    folder = tmp_path / "codellama-tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buf)
    return folder / "tokenizer.model"


@pytest.fixture
def sp_model(tmp_path):
    return code_llama_sentencepiece(tmp_path)


def our_tokenizer(path) -> Tokenizer:
    v = from_sentencepiece(path)
    return Tokenizer(v.bin_pieces(), v.scores, bos_id=v.bos_id, eos_id=v.eos_id)


# (prefix, suffix): code, indentation runs, tabs, non-ASCII, an empty prefix, a space-only suffix
CASES = [("def add(a, b):\n", "\nprint(add(1, 2))"), ("x = ", " + 1"), ("import numpy as np\nx = np.", "(3)\n"),
         ("def fib(n):\n", "\n    return fib(n - 1) + fib(n - 2)\n"), ("class P:\n  def f(self):\n", "\n"),
         ("# é, 日本語 ", " 🍰"), ("", "end"), ("start", " "), ("a\tb", "\tc"),
         ('def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n")]


def test_prompt_is_metas_layout(sp_model):
    """Meta's codellama `_infilling_prompt_tokens`: BOS PRE encode(prefix) SUF encode_infilling(suffix)
    MID, where encode_infilling drops sentencepiece's dummy-prefix space ("☺" + s, first two ids cut)."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = our_tokenizer(sp_model)
    fim = infill.fim_tokens(tok)
    assert (fim.prefix, fim.middle, fim.suffix, fim.end) == tuple(sp.piece_to_id(p) for p in FIM)
    for prefix, suffix in CASES:
        want = ([sp.bos_id(), fim.prefix] + sp.encode(prefix) + [fim.suffix] + sp.encode("☺" + suffix)[2:]
                + [fim.middle])
        assert infill.prompt(tok, fim, prefix, suffix) == want, (prefix, suffix)


def test_prompt_equals_transformers_code_llama_tokenizer(sp_model):
    """transformers' CodeLlamaTokenizer builds the same layout. Two known differences of its 5.x
    (a tokenizers BPE converted from the sentencepiece model) are kept out of these cases and
    checked apart: its Metaspace pre-tokenizer prepends "▁" to a suffix that does not start with a
    space (Meta's reference and transformers 4 do not), and its converted merges split indentation
    runs differently from sentencepiece."""
    pytest.importorskip("google.protobuf", reason="transformers reads sentencepiece models through protobuf")
    transformers = pytest.importorskip("transformers")
    (sp_model.parent / "tokenizer_config.json").write_text('{"tokenizer_class": "CodeLlamaTokenizer"}')
    hf = transformers.CodeLlamaTokenizer.from_pretrained(sp_model.parent)
    tok = our_tokenizer(sp_model)
    fim = infill.fim_tokens(tok)
    assert (hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id) == (fim.prefix, fim.suffix, fim.middle, fim.end)
    for prefix, suffix in [("x = ", " + 1"), ("# é, 日本語 ", " 🍰"), ("start", " "), ("if x:", " return y")]:
        assert hf(prefix, suffix=suffix)["input_ids"] == infill.prompt(tok, fim, prefix, suffix)
    space = tok.encode(" ", bos=False, prefix_space=False)  # "▁"
    for prefix, suffix in [("def add(a, b):\n", "\nprint(add(1, 2))"), ("a\tb", "\tc")]:
        ours = infill.prompt(tok, fim, prefix, suffix)
        at = ours.index(fim.suffix) + 1
        assert hf(prefix, suffix=suffix)["input_ids"] == ours[:at] + space + ours[at:]


def test_vocabulary_without_fim_tokens_has_none():
    assert infill.fim_tokens(Tokenizer.load(asset("tok512.bin"))) is None


# -- running it -------------------------------------------------------------------------------

CONFIG = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32004, seq_len=96)


@pytest.fixture
def fim_model(tmp_path, sp_model):
    """A random model over the Code Llama-extended vocabulary, with its tokenizer.bin."""
    path = tmp_path / "fim.bin"
    llama2c.write(path, CONFIG, random_weights(CONFIG, seed=3, scale=0.5), version=1)
    tok = tmp_path / "fim-tok.bin"
    our_tokenizer(sp_model).save(tok)
    return path, tok


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, out.getvalue(), err.getvalue()


def greedy_middle(llama, ids, fim, limit):
    """Greedy decoding from the full logits of each prefix, up to an end token or `limit` tokens."""
    ids, out = list(ids), []
    while len(out) < limit:
        nxt = int(np.argmax(llama.logits(ids)[-1]))
        if nxt in (fim.end, llama.config.eos_id, llama.config.bos_id):
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_cli_infill_prints_the_greedy_middle(fim_model):
    path, tok = fim_model
    prefix, suffix = "def f(x):\n", "\n    return y\n"
    code, out, err = run_cli(["run", str(path), "-z", str(tok), "--mode", "infill", "--prefix", prefix,
                              "--suffix", suffix, "-t", "0", "-n", "40"])
    assert code == 0, err
    llama = Llama.load(path, tok)
    fim = infill.fim_tokens(llama.tokenizer)
    ids = infill.prompt(llama.tokenizer, fim, prefix, suffix)
    middle = greedy_middle(llama, ids, fim, 40 - len(ids) + 1)
    assert middle  # random weights: some text before any end token
    # the bytes run.c's rules print for each token, as `llama2 run` prints a story's
    raw = b"".join(llama.tokenizer.printable(prev, t) for prev, t in zip([ids[-1]] + middle, middle))
    assert out == raw + b"\n"


def test_infill_without_fim_tokens_is_one_line_usage_error():
    code, out, err = run_cli(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")),
                              "--mode", "infill", "--prefix", "a", "--suffix", "b"])
    assert code == 2 and err.count("\n") == 1 and "fill-in-the-middle" in err and "Traceback" not in err
    code, _, err = run_cli(["run", str(asset("stories260K.bin")), "--suffix", "b"])
    assert code == 2 and "--suffix: only in --mode infill" in err
    code, _, err = run_cli(["run", str(asset("stories260K.bin")), "--mode", "infill", "--prefix", "a"])
    assert code == 2 and "needs --suffix" in err


def test_completion_suffix_is_an_infill_and_stops_at_eot(fim_model):
    path, tok = fim_model
    llama = Llama.load(path, tok)
    fim = infill.fim_tokens(llama.tokenizer)
    ids = infill.prompt(llama.tokenizer, fim, "x = ", " + 1")
    got = llama.create_completion("x = ", suffix=" + 1", max_tokens=8, temperature=0)
    assert got["usage"]["prompt_tokens"] == len(ids)
    middle = greedy_middle(llama, ids, fim, 8)
    assert got["usage"]["completion_tokens"] == len(middle)
    decoder = StreamDecoder(llama.tokenizer)
    text = "".join(decoder.push(prev, t)[1] for prev, t in zip([ids[-1]] + middle, middle)) + decoder.flush()
    assert got["choices"][0]["text"] == text
    # the server's parse gives the same Params: the infill prompt, ending at EOT
    req = protocol.parse_completion({"model": "m", "prompt": "x = ", "suffix": " + 1", "temperature": 0},
                                    llama.tokenizer, llama.config)
    assert list(req.params.prompt) == ids and fim.end in req.params.stop_tokens
    # a sampled EOT ends the middle, unprinted
    seq = Sequence(req.params, llama.tokenizer)
    logits = np.zeros(CONFIG.vocab_size, np.float32)
    logits[fim.end] = 1
    (end,) = seq.advance(logits)
    assert end.finish_reason == "stop" and end.text == "" and seq.stop_token == fim.end
    plain = protocol.parse_completion({"model": "m", "prompt": "x = ", "suffix": ""}, llama.tokenizer, llama.config)
    assert list(plain.params.prompt) == llama.encode("x = ") and fim.end not in plain.params.stop_tokens


def test_completion_suffix_without_fim_tokens_names_the_field(llama):
    with pytest.raises(RequestError, match="^suffix: .*fill-in-the-middle"):
        llama.create_completion("a", suffix="b")
    with pytest.raises(protocol.APIError) as e:
        protocol.parse_completion({"model": "m", "prompt": "a", "suffix": "b"}, llama.tokenizer, llama.config)
    assert e.value.status == 400 and e.value.param == "suffix"
