"""Chat templates that come with the model (GGUF / Hugging Face / our header) and --chat-template."""

import io

from conftest import TINY, byte_tokenizer, random_weights
from llama2.chat import encode_turn, marker_ids
from llama2.chat_template import JINJA, detect
from llama2.cli import main
from llama2.formats import llama2c
from llama2.tokenizer import Tokenizer


def run_cli(argv, stdin=""):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def chatml_tokenizer(vocab_size) -> Tokenizer:
    """A byte tokenizer whose last two pieces are ChatML's markers, as in TinyLlama-chat models."""
    tok = byte_tokenizer(vocab_size)
    pieces = tok.pieces[:-2] + [b"<|im_start|>", b"<|im_end|>"]
    return Tokenizer(pieces, tok.scores)


def test_detect():
    assert detect(JINJA["llama2"]) == "llama2" and detect(JINJA["chatml"]) == "chatml"
    assert detect("{{ messages }}") is None and detect(None) is None
    assert detect([{"name": "default", "template": "<|im_start|>"}]) == "chatml"


def test_markers_are_single_tokens():
    tok = chatml_tokenizer(TINY.vocab_size)
    markers = marker_ids(tok, "chatml")
    assert markers == {"<|im_start|>": TINY.vocab_size - 2, "<|im_end|>": TINY.vocab_size - 1}
    ids = encode_turn(tok, "<|im_start|>user\nhi<|im_end|>\n", markers)
    assert ids[:2] == [1, TINY.vocab_size - 2] and TINY.vocab_size - 1 in ids
    assert ids[2:ids.index(TINY.vocab_size - 1)] == tok.encode("user\nhi", bos=False)
    assert encode_turn(tok, "[INST] hi [/INST]", {}) == tok.encode("[INST] hi [/INST]")


def test_template_from_the_checkpoint_and_override(tmp_path):
    weights = random_weights(TINY)
    tok = tmp_path / "tok.bin"
    chatml_tokenizer(TINY.vocab_size).save(tok)
    plain, tagged = tmp_path / "plain.bin", tmp_path / "chatml.bin"
    llama2c.write(plain, TINY, weights, version=1)
    llama2c.write(tagged, TINY, weights, version=3, chat_template="chatml")
    args = ["--mode", "chat", "-t", "1", "-s", "7", "-n", "60", "-i", "hello there", "-y", "be brief", "-z", str(tok)]
    code, from_model, err = run_cli(["run", str(tagged), *args])
    assert code == 0, err
    assert run_cli(["run", str(plain), *args, "--chat-template", "chatml"])[1] == from_model
    assert run_cli(["run", str(tagged), *args, "--chat-template", "chatml"])[1] == from_model
    llama2_style = run_cli(["run", str(tagged), *args, "--chat-template", "llama2"])[1]
    assert llama2_style == run_cli(["run", str(plain), *args])[1]  # run.c's template by default
    assert llama2_style != from_model
    code, _, err = run_cli(["run", str(tagged), *args, "--chat-template", "zephyr"])
    assert code == 2 and err.count("\n") == 1
