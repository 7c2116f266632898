"""Chat templates: the model's own Jinja renders the string transformers' apply_chat_template
renders (six families, system prompts, multi-turn, add_generation_prompt), special tokens are
parsed in the template and never in messages, and the Python API uses the same path."""

import json

import pytest

from chat_template_cases import CONVERSATIONS, FAMILIES
from conftest import TINY, asset, random_weights
from llama2.chat_template import ChatTemplate, TemplateError, token_texts
from llama2.formats import gguf, hf
from llama2.formats.vocab import load_vocab
from llama2 import request

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<s>", "</s>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A small byte-level BPE tokenizer.json (trained by `tokenizers`) holding every family's
    special tokens."""
    T = tokenizers
    tok = T.Tokenizer(T.models.BPE())
    tok.pre_tokenizer = T.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = T.decoders.ByteLevel()
    trainer = T.trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                    initial_alphabet=T.pre_tokenizers.ByteLevel.alphabet())
    text = asset("tinystories_train_sample_2MiB.txt").read_text(encoding="utf-8")[:100_000]
    tok.train_from_iterator([text], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def folder(tmp_path, tokenizer_json, family):
    """A Hugging Face tokenizer folder whose tokenizer_config.json carries the family's template."""
    template, bos, eos, _ = FAMILIES[family]
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "chat_template": template}))
    return tmp_path


def conversations(family):
    takes_system = FAMILIES[family][3]
    return [c for c in CONVERSATIONS if takes_system or c[0]["role"] != "system"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_string_as_transformers(tmp_path, tokenizer_json, family):
    path = folder(tmp_path, tokenizer_json, family)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = hf.read_chat_template(path)
    tok = load_vocab(path / "tokenizer.json").tokenizer(str(path))
    cases = conversations(family)
    assert any(len(c) > 2 for c in cases)  # multi-turn among them (and but for Mistral a system prompt)
    for conv in cases:
        for gen in (True, False):
            want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.render(conv, gen, *token_texts(tok)) == want, (family, conv, gen)


@pytest.mark.parametrize("family", ["llama3", "chatml", "zephyr"])
def test_specials_parsed_in_the_template_never_in_messages(tmp_path, tokenizer_json, family):
    path = folder(tmp_path, tokenizer_json, family)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = hf.read_chat_template(path)
    tok = load_vocab(path / "tokenizer.json").tokenizer(str(path))
    for conv in CONVERSATIONS[:3]:  # no special-token text in the messages: the same ids
        want = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.encode(tok, conv) == list(want), (family, conv)
    # a message spelling <|eot_id|>, </s>: text in ours, a special token in a plain tokenization
    conv = CONVERSATIONS[3]
    ids = ours.encode(tok, conv)
    plain = tok.encode(ours.render(conv, True, *token_texts(tok)), bos=False, special=True)
    for special in ("<|eot_id|>", "</s>"):
        sid = tok.special[special]
        assert plain.count(sid) == ids.count(sid) + 1
    assert tok.decode(ids).count("<|eot_id|> </s> [INST]") == 1  # spelled out, as the user typed it


def test_template_that_raises_is_one_line_naming_the_model(tmp_path, tokenizer_json):
    path = folder(tmp_path, tokenizer_json, "mistral")
    ours = hf.read_chat_template(path)
    conv = CONVERSATIONS[1]  # a system message: Mistral's template refuses it
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        ref.apply_chat_template(conv, tokenize=False)
    with pytest.raises(TemplateError) as e:
        ours.render(conv)
    assert str(e.value) == (f"{path / 'tokenizer_config.json'}: chat template: "
                            "Conversation roles must alternate user/assistant/user/assistant/...")
    from llama2.errors import FormatError
    with pytest.raises(FormatError, match=r"^m.gguf: chat template does not parse \("):
        ChatTemplate("{% for m in messages %}", "m.gguf")


def test_sandboxed():
    evil = ChatTemplate("{{ messages.__class__.__mro__ }}", "evil.gguf")
    with pytest.raises(TemplateError, match="^evil.gguf: chat template"):
        evil.render([{"role": "user", "content": "x"}])


def llama3_gguf(tmp_path, tokenizer_json):
    """A tiny random model as a GGUF carrying a byte-level vocabulary and Llama 3's template (as
    tokenizer_config.json gives it), written by our GGUF writer; returns (path, HF folder)."""
    import dataclasses

    path = folder(tmp_path, tokenizer_json, "llama3")
    vocab = load_vocab(path / "tokenizer.json")
    vocab = dataclasses.replace(vocab, source=None, bos_id=SPECIALS.index("<|begin_of_text|>"),
                                eos_id=SPECIALS.index("<|eot_id|>"))
    config = dataclasses.replace(TINY, vocab_size=len(vocab.pieces), seq_len=256, bos_id=vocab.bos_id,
                                 eos_id=vocab.eos_id)
    weights = random_weights(config, seed=3, scale=0.3)
    model = tmp_path / "m.gguf"
    gguf.write(model, config, lambda name, layer=None: weights[name] if layer is None else weights[name][layer],
               vocab, chat_template=hf.read_chat_template(path))
    return model, path


def test_python_api_and_chat_completion_use_the_models_template(tmp_path, tokenizer_json):
    """Llama.apply_chat_template equals transformers'; create_chat_completion encodes the same
    prompt, stops at <|eot_id|> and prints no special token."""
    from llama2 import Llama
    from llama2.completions import chat_params

    model, path = llama3_gguf(tmp_path, tokenizer_json)
    llama = Llama.load(model, kv_type="f32")
    # the vocabulary came through our GGUF writer and reader: the same ids as `tokenizers`
    words = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    words.encode_special_tokens = True
    for text in ["Once upon a time, 42 cats   ran.\n\n", "<|eot_id|> as text", "日本語 🍰"]:
        assert llama.encode(text, bos=False) == words.encode(text, add_special_tokens=False).ids
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    conv = CONVERSATIONS[2]
    assert llama.apply_chat_template(conv) == ref.apply_chat_template(conv, tokenize=False,
                                                                      add_generation_prompt=True)
    assert llama.apply_chat_template(conv, False) == ref.apply_chat_template(conv, tokenize=False)
    body = request.validate(request.ChatBody, dict(messages=conv))
    params = chat_params(llama.tokenizer, llama.config, body, llama.chat_template)
    assert list(params.prompt) == llama.chat_template.encode(llama.tokenizer, conv)
    assert SPECIALS.index("<|eot_id|>") in params.stop_tokens
    answer = llama.create_chat_completion(conv, max_tokens=8, temperature=0)
    text = answer["choices"][0]["message"]["content"]
    assert not any(s in text for s in SPECIALS)


def run_cli(argv, stdin=""):
    import io

    from llama2.cli import main
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue().decode("utf-8", errors="replace"), err.getvalue()


def test_cli_chat_turns_equal_the_api_over_the_whole_history(tmp_path, tokenizer_json):
    """The CLI's chat renders the whole conversation with the model's template each turn and
    keeps the cached positions it shares: each reply equals create_chat_completion's on the
    history so far (greedy)."""
    from llama2 import Llama
    model, _ = llama3_gguf(tmp_path, tokenizer_json)
    llama = Llama.load(model, kv_type="f32")
    code, out, err = run_cli(["run", str(model), "--mode", "chat", "-t", "0", "-y", "Be brief.",
                              "-i", "Tell me a story.", "--kv-type", "f32"], stdin="And then?\n")
    assert code == 0, err
    replies = [part.split("\nUser: ")[0].rstrip("\n") for part in out.split("Assistant: ")[1:]]
    assert len(replies) == 2 and all(replies), out
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    for turn, user in enumerate(["Tell me a story.", "And then?"]):
        if turn:
            history += [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": user}]
        want = llama.create_chat_completion(history, temperature=0)
        assert replies[turn] == want["choices"][0]["message"]["content"]


def test_chat_template_file_overrides_and_a_raising_one_is_one_line(tmp_path, tokenizer_json):
    from llama2 import Llama
    from llama2.chat_template import override
    model, _ = llama3_gguf(tmp_path, tokenizer_json)
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(FAMILIES["chatml"][0])
    llama = Llama.load(model, chat_template=override(str(chatml)))
    assert llama.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    code, out, err = run_cli(["run", str(model), "--mode", "chat", "-t", "0", "-n", "60", "-y", "",
                              "-i", "hi", "--chat-template", str(chatml)])
    assert code == 0 and out.startswith("Assistant: "), err
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompt, please') }}"
                      "{% endif %}{{ messages[0]['content'] }}")
    code, _, err = run_cli(["run", str(model), "--mode", "chat", "-y", "S", "-i", "hi", "--chat-template", str(strict)])
    assert (code, err) == (1, f"llama2: error: {strict}: chat template: no system prompt, please\n")
    code, _, err = run_cli(["run", str(model), "--mode", "chat", "-i", "hi", "--chat-template", "nope"])
    assert code == 2 and err.count("\n") == 1 and "--chat-template" in err


def test_every_declared_end_token_ends_a_reply(tmp_path, tokenizer_json):
    """eos_token_id lists of config.json and generation_config.json, and the end-of-turn special
    tokens (<|eot_id|>, <|im_end|>) by their text."""
    from llama2.chat import reply_end_ids
    from llama2.errors import FormatError
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert hf.eos_ids(tmp_path) == {1, 5, 6}
    vocab = load_vocab(tokenizer_json)
    vocab.eos_ids = tuple(hf.eos_ids(tmp_path))
    tok = vocab.tokenizer(str(tokenizer_json))
    template = hf.read_chat_template(folder(tmp_path, tokenizer_json, "llama3"))
    turn_ends = {SPECIALS.index("<|eot_id|>"), SPECIALS.index("<|im_end|>")}  # special in this vocabulary
    assert reply_end_ids(tok, template, tok.eos_id) == {tok.eos_id, 1, 5, 6} | turn_ends
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(FormatError, match=r"generation_config.json: eos_token_id: expected an id"):
        hf.eos_ids(tmp_path)


def test_structured_output_on_a_byte_level_vocabulary(tmp_path, tokenizer_json):
    """A grammar holds on byte-level tokens too, right after BOS as well (no piece loses its space
    there, as sentencepiece pieces do)."""
    import re

    from llama2 import Llama
    from llama2.structured import Spec
    pytest.importorskip("llguidance")
    model, _ = llama3_gguf(tmp_path, tokenizer_json)
    llama = Llama.load(model, kv_type="f32")
    pattern = r" [a-z]{1,6} [0-9]{2}"
    for seed in (1, 2, 3):
        r = llama.create_completion("", max_tokens=30, seed=seed, temperature=1.0, grammar=Spec("regex", pattern))
        assert r["choices"][0]["finish_reason"] == "stop"
        assert re.fullmatch(pattern, r["choices"][0]["text"]), r["choices"][0]["text"]


def test_export_keeps_a_jinja_template_in_gguf_and_warns_for_llama2c(tmp_path):
    import io

    from conftest import byte_tokenizer
    from llama2.cli import main
    from llama2.formats import llama2c
    model, tok = tmp_path / "m.bin", tmp_path / "tok.bin"
    llama2c.write(model, TINY, random_weights(TINY), version=1)
    byte_tokenizer(TINY.vocab_size).save(tok)
    jinja = tmp_path / "t.jinja"
    jinja.write_text(FAMILIES["zephyr"][0])
    out, err = tmp_path / "m.gguf", io.StringIO()
    assert main(["export", str(out), "--from", str(model), "--format", "gguf", "--tokenizer", str(tok),
                 "--chat-template", str(jinja)], stdout=io.BytesIO(), stderr=err) == 0, err.getvalue()
    assert gguf.read(out)[0]["tokenizer.chat_template"] == FAMILIES["zephyr"][0]
    err = io.StringIO()
    assert main(["export", str(tmp_path / "v3.bin"), "--from", str(model), "--chat-template", str(jinja)],
                stdout=io.BytesIO(), stderr=err) == 0
    assert f"{jinja}'s is left out" in err.getvalue()
    assert llama2c.load(tmp_path / "v3.bin").chat_template is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_history_ending_with_a_reply_is_where_its_next_turn_begins(tmp_path, tokenizer_json, family):
    """encode_dialog(..., add_generation_prompt=False): the ids a chat's next turn starts with
    (what the server computes ahead of that turn, server/routes.py)."""
    from llama2.chat import encode_dialog
    path = folder(tmp_path, tokenizer_json, family)
    template = hf.read_chat_template(path)
    tok = load_vocab(path / "tokenizer.json").tokenizer(str(path))
    for conv in conversations(family):
        history = [(m["role"], m["content"]) for m in conv] + [("assistant", " Once upon a time, a dog.")]
        ids = encode_dialog(tok, history, template, add_generation_prompt=False)
        assert ids == template.encode(tok, history, add_generation_prompt=False)
        nxt = encode_dialog(tok, history + [("user", "And then?")], template)
        assert nxt[:len(ids)] == ids and len(nxt) > len(ids), (family, conv)
