"""Byte-level BPE tokenizers against their references: the `tokenizers` library on the same
tokenizer.json, Meta's tiktoken tokenizer on its Llama 3 tokenizer.model, llama.cpp's ids on a GGUF
its own converter wrote."""

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import asset, golden
from tokenizer_corpus import CORPUS, clean, meta_tokenizer_path
from llama2.formats import gguf
from llama2.formats.vocab import load_vocab
from llama2.tokenizer import StreamDecoder

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def llama3():
    """Ours and Meta's (tiktoken) tokenizers of Meta's Llama 3 tokenizer.model."""
    path = meta_tokenizer_path()
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    return load_vocab(path).tokenizer(str(path)), MetaTokenizer(path)


def test_tiktoken_ids_equal_metas(llama3):
    ours, meta = llama3
    assert ours.vocab_size == meta.n_words
    assert (ours.bos_id, ours.eos_id) == (meta.bos_id, meta.eos_id)
    for text in CORPUS:
        # Meta's encode takes special tokens in text as text unless told otherwise, as ours does
        assert ours.encode(text) == meta.encode(clean(text), bos=True, eos=False), text
        assert ours.decode(ours.encode(text, bos=False)) == clean(text)


def test_special_tokens_parsed_only_when_asked(llama3):
    ours, meta = llama3
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert ours.encode(text, bos=False, special=True) == meta.encode(text, bos=False, eos=False,
                                                                     allowed_special="all")
    plain = ours.encode(text, bos=False)
    assert meta.eot_id not in plain and plain == meta.encode(text, bos=False, eos=False)
    assert {meta.eot_id, meta.eom_id} <= ours.end_ids
    assert ours.decode([meta.eot_id]) == ""  # special tokens never print


def test_stream_decode_never_splits_a_character(llama3):
    ours, _ = llama3
    for text in CORPUS:
        ids = ours.encode(text)
        stream = StreamDecoder(ours)
        pieces = [stream.push(prev, t)[1] for prev, t in zip(ids, ids[1:])] + [stream.flush()]
        assert "".join(pieces) == clean(text)
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in clean(text)
    emoji = ours.encode("🍰", bos=False)
    assert len(emoji) > 1  # a character split over tokens: the case above is not vacuous


def test_gguf_ids_equal_llamacpps_on_every_golden_case():
    path = asset("llama3/tiny-llama3-f16.gguf")
    cases = json.loads(golden("tiny-llama3-golden.json").read_text())
    meta, _, _ = gguf.read(path)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    tok = gguf.vocab_from_metadata(meta).tokenizer(str(path))
    case = cases["files"]["tiny-llama3-f16.gguf"]
    assert len(case["ids"]) == len(cases["texts"])
    for text, ids, hf_ids in zip(cases["texts"], case["ids"], case["hf_ids_specials_as_text"]):
        assert tok.encode(text) == ids, text
        assert tok.encode(text, bos=False) == hf_ids, text


def train_tokenizer_json(tmp_path, pre) -> Path:
    """A small byte-level BPE tokenizer.json trained by `tokenizers` itself, with the pre-tokenizer
    of GPT-2 ("gpt-2"), Llama 3 ("llama-bpe") or SmolLM ("smollm")."""
    from llama2.bytelevel import LLAMA3_PATTERN
    T = tokenizers
    tok = T.Tokenizer(T.models.BPE(ignore_merges=pre == "llama-bpe"))
    P = T.pre_tokenizers
    tok.pre_tokenizer = {
        "gpt-2": P.ByteLevel(add_prefix_space=False),
        "llama-bpe": P.Sequence([P.Split(T.Regex(LLAMA3_PATTERN), behavior="isolated"),
                                 P.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "smollm": P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False)]),
    }[pre]
    tok.decoder = T.decoders.ByteLevel()
    trainer = T.trainers.BpeTrainer(vocab_size=700, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                    initial_alphabet=P.ByteLevel.alphabet(), show_progress=False)
    text = asset("tinystories_train_sample_2MiB.txt").read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text, *CORPUS[:7]], trainer)
    out = tmp_path / "tokenizer.json"
    tok.save(str(out))
    return out


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_tokenizer_json_and_its_gguf_form_equal_tokenizers(tmp_path, pre):
    path = train_tokenizer_json(tmp_path, pre)
    ref = tokenizers.Tokenizer.from_file(str(path))
    ref.encode_special_tokens = True  # user text: specials stay text
    vocab = load_vocab(path)
    assert (vocab.model, vocab.pre) == ("gpt2", pre)
    from_json = vocab.tokenizer(str(path))
    # the GGUF route: tokens, merges and the pre-tokenizer's name only, as gguf.write stores them
    from_gguf = dataclasses.replace(vocab, source=None).tokenizer("test.gguf")
    for text in CORPUS:
        want = ref.encode(clean(text), add_special_tokens=False).ids
        assert from_json.encode(text, bos=False) == want, text
        assert from_gguf.encode(text, bos=False) == want, text
    eot = ref.token_to_id("<|eot_id|>")
    assert from_gguf.encode("a<|eot_id|>", bos=False, special=True)[-1] == eot
    assert eot not in from_gguf.encode("a<|eot_id|>", bos=False)


def test_unknown_pre_tokenizer_is_one_line_error(tmp_path):
    from llama2.errors import FormatError
    vocab = dataclasses.replace(load_vocab(train_tokenizer_json(tmp_path, "gpt-2")), source=None, pre="qwen9")
    with pytest.raises(FormatError, match=r"^model.gguf: pre-tokenizer 'qwen9' is not supported"):
        vocab.tokenizer("model.gguf")


def test_tokenize_cli_reads_a_byte_level_tokenizer_json(tmp_path):
    import io

    from llama2.cli import main
    path = train_tokenizer_json(tmp_path, "llama-bpe")
    ref = tokenizers.Tokenizer.from_file(str(path))
    out = io.BytesIO()
    text = "Once upon a time, 12345 cats <|eot_id|>"
    assert main(["tokenize", "-z", str(path), "--no-bos", text], stdout=out, stderr=io.StringIO()) == 0
    ref.encode_special_tokens = True
    assert out.getvalue().decode().split() == [str(i) for i in ref.encode(text, add_special_tokens=False).ids]
