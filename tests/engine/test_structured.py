"""Structured output (llguidance): masks over the model's own vocabulary, and seeded samples from
stories260K at temperature 1 that always parse and validate (JSON schemas, regexes, grammars)."""

import io
import json
import re

import numpy as np
import pytest

from conftest import asset

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from structured_cases import REGEXES, SCHEMAS, json_format  # noqa: E402

from llama2.completions import RequestError  # noqa: E402
from llama2.structured import Grammar, GrammarError, Spec, Vocabulary  # noqa: E402

SAMPLES = 20
MAX_TOKENS = 256


# -- the vocabulary as llguidance sees it ---------------------------------------------------------

def test_vocabulary_bytes_and_specials(llama):
    tok = llama.tokenizer
    vocab = Vocabulary.of(tok)
    assert Vocabulary.of(tok) is vocab  # built once per tokenizer
    assert vocab.special == {0, tok.bos_id, tok.eos_id}
    # llguidance decodes each token to the bytes we print: byte-fallback pieces are their byte
    for i in range(3, tok.vocab_size):
        if tok.pieces[i] == b"<0xFF>":
            continue  # 0xFF marks special tokens in llguidance; it never occurs in UTF-8 text anyway
        assert vocab.ll.decode_bytes([i]) == tok.piece(-1, i), i
    assert tok.pieces[3 + 0xE2] == b"<0xE2>" and vocab.ll.decode_bytes([3 + 0xE2]) == b"\xe2"


def test_first_mask_is_every_token_that_can_begin_the_match(llama):
    tok = llama.tokenizer
    c = Grammar.compile(Spec("regex", "(ab|cd|e) x"), tok).constraint()
    allowed = set(np.flatnonzero(c.allowed()).tolist())
    expected = {i for i in range(3, tok.vocab_size) if tok.piece(-1, i)
                and any(s.startswith(tok.piece(-1, i)) for s in (b"ab x", b"cd x", b"e x"))}
    assert allowed == expected
    assert {3 + ord("a"), 3 + ord("c"), 3 + ord("e")} <= allowed and tok.eos_id not in allowed


def test_stop_tokens_only_where_the_grammar_accepts(llama):
    tok = llama.tokenizer
    a = 3 + ord("a")
    c = Grammar.compile(Spec("regex", "a+"), tok).constraint(stop_tokens={tok.bos_id})
    assert not c.allowed()[[tok.eos_id, tok.bos_id]].any()
    c.advance(a)
    ok = c.allowed()
    assert ok[tok.eos_id] and ok[tok.bos_id] and ok[a]
    c = Grammar.compile(Spec("regex", "a"), tok).constraint()
    c.advance(a)
    assert c.done
    assert np.flatnonzero(c.allowed()).tolist() == [tok.eos_id]


def test_after_bos_no_piece_that_loses_its_space(llama):
    tok = llama.tokenizer
    grammar = Grammar.compile(Spec("regex", " the [a-z]+"), tok)
    anywhere = grammar.constraint().allowed()
    after_bos = grammar.constraint(after_bos=True).allowed()
    spaced = [i for i in np.flatnonzero(anywhere) if tok.pieces[i].startswith(b" ")]
    assert spaced and not after_bos[spaced].any()
    # forced text " the" is offered as one spaced piece; after BOS it is spelled with byte pieces
    assert np.flatnonzero(after_bos).tolist() == [3 + 0x20]
    r = llama.create_completion("", seed=3, max_tokens=30, grammar=Spec("regex", " the [a-z]+"))
    assert re.fullmatch(" the [a-z]+", r["choices"][0]["text"]), r


def test_masked_tokens_are_never_sampled(llama):
    tok = llama.tokenizer
    c = Grammar.compile(Spec("regex", "[0-9]+"), tok).constraint()
    logits = np.random.default_rng(0).standard_normal(tok.vocab_size).astype(np.float32)
    masked = c.mask(logits)
    ok = c.allowed()
    assert np.isneginf(masked[~ok]).all() and (masked[ok] == logits[ok]).all()


# -- 20 seeded samples at temperature 1 validate ---------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_samples_validate(llama, name):
    schema = SCHEMAS[name]
    for seed in range(1, SAMPLES + 1):
        r = llama.create_completion("Once upon a time", max_tokens=MAX_TOKENS, seed=seed, temperature=1.0,
                                    response_format=json_format(name, schema))
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop", (seed, choice)
        jsonschema.validate(json.loads(choice["text"]), schema)


@pytest.mark.parametrize("name", ["nested", "enums"])
def test_chat_json_schema_samples_validate(llama, name):
    schema = SCHEMAS[name]
    for seed in range(1, SAMPLES + 1):
        r = llama.create_chat_completion([{"role": "user", "content": "Describe a dog."}], seed=seed,
                                         temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS,
                                         response_format=json_format(name, schema))
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop", (seed, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_samples_parse(llama):
    for seed in range(1, SAMPLES + 1):
        r = llama.create_completion("Once upon a time", max_tokens=MAX_TOKENS, seed=seed, temperature=1.0,
                                    response_format={"type": "json_object"})
        choice = r["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["text"]), dict)
        else:  # a free-form object may run out of tokens; what there is is a prefix of one
            assert choice["finish_reason"] == "length" and choice["text"].startswith("{")


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_samples_match(llama, regex):
    from llama2.structured import Spec
    for seed in range(1, SAMPLES + 1):
        r = llama.create_completion("Once upon a time", max_tokens=MAX_TOKENS, seed=seed, temperature=1.0,
                                    grammar=Spec("regex", regex))
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop", (seed, choice)
        assert re.fullmatch(regex, choice["text"]), (seed, choice["text"])


@pytest.mark.parametrize("kind_text", [
    'start: answer " " NUM\nanswer: "yes" | "no"\nNUM: /[1-9][0-9]?/\n',  # Lark
    'root ::= ("yes" | "no") " " [1-9] [0-9]?\n',  # GBNF
])
def test_grammar_samples_match(llama, kind_text):
    for seed in range(1, SAMPLES + 1):
        r = llama.create_completion("", max_tokens=MAX_TOKENS, seed=seed, temperature=1.0,
                                    grammar=Spec("grammar", kind_text))
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop" and re.fullmatch(r"(yes|no) [1-9][0-9]?", choice["text"]), choice


def test_streamed_structured_output_equals_whole(llama):
    fmt = json_format("nested", SCHEMAS["nested"])
    whole = llama.create_chat_completion([{"role": "user", "content": "Hi"}], seed=5, max_tokens=MAX_TOKENS,
                                         response_format=fmt)
    chunks = list(llama.create_chat_completion([{"role": "user", "content": "Hi"}], seed=5, stream=True,
                                               max_tokens=MAX_TOKENS, response_format=fmt))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- what cannot be compiled is refused, naming the problem --------------------------------------

@pytest.mark.parametrize("fmt,param,words", [
    (json_format("bad", {"type": "objectt"}), "response_format", "objectt"),
    (json_format("bad", {"type": "integer", "minimum": 5, "maximum": 2}), "response_format", ""),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "required"),
    ({"type": "xml"}, "response_format.type", "xml"),
    ("json", "response_format", "object"),
])
def test_bad_response_format(llama, fmt, param, words):
    with pytest.raises(RequestError) as e:
        llama.create_completion("Hi", response_format=fmt)
    assert e.value.param == param and words in str(e.value)
    assert str(e.value).startswith(param + ":") and "\n" not in str(e.value)


def test_bad_regex_and_grammar(llama):
    with pytest.raises(RequestError, match=r"^grammar: cannot be compiled: regex: .*unclosed character class"):
        llama.create_completion("Hi", grammar=Spec("regex", "[a-"))
    with pytest.raises(RequestError, match=r"^grammar: cannot be compiled: grammar: "):
        llama.create_completion("Hi", grammar=Spec("grammar", "start: foo\n"))
    with pytest.raises(GrammarError, match="json_schema: not valid JSON"):
        Grammar.compile(Spec("json_schema", "{x"), llama.tokenizer)


def test_strict_false_ignores_what_llguidance_does_not_implement(llama):
    schema = {"type": "string", "maxLength": 5, "format": "no-such-format"}
    with pytest.raises(RequestError, match="no-such-format"):
        llama.create_completion("Hi", response_format=json_format("s", schema))
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": False}}
    r = llama.create_completion("Hi", seed=1, max_tokens=40, response_format=fmt)
    assert len(json.loads(r["choices"][0]["text"])) <= 5


# -- the CLI ---------------------------------------------------------------------------------------

def run_cli(*argv, stdin=""):
    from llama2.cli import main
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), *argv],
                stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue().decode(), err.getvalue()


def test_cli_json_schema(tmp_path):
    schema = SCHEMAS["nested"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    for seed in (1, 2, 3):
        code, out, err = run_cli("-i", "A dog:", "-s", str(seed), "--json-schema", str(path))
        assert code == 0, err
        assert out.startswith("A dog:") and out.endswith("\n")
        jsonschema.validate(json.loads(out[len("A dog:"):-1]), schema)


def test_cli_regex_and_grammar(tmp_path):
    code, out, _ = run_cli("-s", "4", "--regex", "[0-9]{3}-[a-z]{2,4}")
    assert code == 0 and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}\n", out), out
    g = tmp_path / "g.gbnf"
    g.write_text('root ::= ("yes" | "no") "!"\n')
    code, out, _ = run_cli("-s", "4", "-i", "Answer:", "--grammar", str(g))
    assert code == 0 and re.fullmatch(r"Answer:(yes|no)!\n", out), out


@pytest.mark.parametrize("content,flag,message", [
    (None, "--json-schema", "no such file (expected a JSON schema file)"),
    ("{x", "--json-schema", "not valid JSON"),
    ("[1, 2]", "--json-schema", "expected a JSON schema object, got list"),
    ("[" * 5000 + "]" * 5000, "--json-schema", "nested deeper than 64 levels"),
    ('{"items": ' * 70 + "{}" + "}" * 70, "--json-schema", "nested deeper than 64 levels"),
    ('{"type": "objectt"}', "--json-schema", "cannot be compiled: json_schema: Invalid type: objectt"),
    ("start: nowhere\n", "--grammar", "cannot be compiled: grammar:"),
])
def test_cli_bad_files(tmp_path, content, flag, message):
    path = tmp_path / "f"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli("-i", "x", flag, str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"llama2: error: {flag} {path}: {message}") and err.count("\n") == 1, err


def test_cli_bad_regex():
    code, _, err = run_cli("--regex", "(")
    assert code == 2 and err.startswith("llama2: error: --regex (: cannot be compiled: regex:") and err.count("\n") == 1


def test_inference_runs_without_llguidance_imported():
    import subprocess
    import sys
    from conftest import REPO
    code = ("import sys\nfrom llama2 import Llama\n"
            f"l = Llama.load({str(asset('stories260K.bin'))!r}, {str(asset('tok512.bin'))!r})\n"
            "l.create_completion('Hi', seed=1, max_tokens=4)\nl.create_chat_completion("
            "[{'role': 'user', 'content': 'Hi'}], seed=1, max_tokens=4, logprobs=True)\n"
            "assert 'llguidance' not in sys.modules and 'torch' not in sys.modules\n")
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cli_chat_replies_follow_the_schema(tmp_path):
    schema = SCHEMAS["enums"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    code, out, err = run_cli("-m", "chat", "-y", "", "-s", "3", "--json-schema", str(path),
                             stdin="Pick a color.\nAnother one.\n")
    assert code == 0, err
    replies = [line.split("Assistant: ", 1)[1] for line in out.splitlines() if "Assistant: " in line]
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)


def test_bench_structured_smoke():
    """`llama2 bench structured` runs end to end and reports each grammar (no figure is asserted)."""
    from llama2.cli import main
    out, err = io.BytesIO(), io.StringIO()
    code = main(["bench", "structured", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")),
                 "--samples", "1", "--max-tokens", "12", "--json"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    info = json.loads(out.getvalue())
    assert info["model"] == "stories260K" and info["vocab"] == 512
    assert [r["grammar"] for r in info["rows"]] == ["json_object", "json_schema (nested)", "regex"]
    for r in info["rows"]:
        assert r["tokens"] > 0 and r["mask_us"] > 0 and r["apply_us"] > 0 and r["step_ms"] > 0


def test_llama2_vocabulary_32000():
    """The 32000-token Llama 2 vocabulary (byte fallback, multi-byte pieces), on a random model."""
    from llama2 import Llama
    llama = Llama.load(asset("rand-gqa-unshared.bin"), asset("tokenizer.bin"))
    schema = {"type": "object",
              "properties": {"color": {"enum": ["red", "green", "blue"]},
                             "n": {"type": "integer", "minimum": 0, "maximum": 99},
                             "word": {"type": "string", "maxLength": 6}, "é": {"type": "boolean"}},
              "required": ["color", "n", "word", "é"], "additionalProperties": False}
    for seed in range(1, 6):
        r = llama.create_completion("Hello", seed=seed, max_tokens=120, response_format=json_format("x", schema))
        assert r["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r["choices"][0]["text"]), schema)


# -- refused at compile time, and the compiled-grammar cache -------------------------------------

DEEP = {"type": "array", "items": {}}
for _ in range(70):
    DEEP = {"type": "array", "items": DEEP}


@pytest.mark.parametrize("schema,param,words", [
    ({"$ref": "#"}, "response_format", "recursive $ref '#'"),
    ({"type": "array", "items": {"type": "object", "properties": {"up": {"$ref": "#"}}}}, "response_format",
     "recursive"),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}]}, "b": {"items": {"$ref": "#/$defs/a"}}},
      "$ref": "#/$defs/a"}, "response_format", "recursive"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}, "response_format",
     "600 optional properties"),
    (DEEP, "response_format.json_schema.schema", "deeper than 64"),
    ("[" * 5000 + "]" * 5000, "response_format.json_schema.schema", "deeper than 64"),
])
def test_refused_at_compile_time(llama, schema, param, words):
    with pytest.raises(RequestError) as e:
        llama.create_completion("Hi", response_format=json_format("s", schema))
    assert e.value.param == param and words in str(e.value), str(e.value)


def test_shared_refs_and_required_properties_are_not_refused(llama):
    point = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {"$defs": {"p": point}, "type": "object", "additionalProperties": False,
              "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"},
                             **{f"r{i}": {"type": "boolean"} for i in range(600)}},
              "required": ["a", "b", *(f"r{i}" for i in range(600))]}
    r = llama.create_completion("Hi", seed=2, max_tokens=40, response_format=json_format("s", schema))
    assert re.match(r'\{"a": [0-9], "b": [0-9], "r0": ', r["choices"][0]["text"]), r["choices"][0]["text"]


def test_grammar_cache_compiles_once_and_stays_bounded(llama):
    from llama2.structured import GrammarCache

    vocab = Vocabulary.of(llama.tokenizer)
    built = []

    def build(spec):
        built.append(spec)
        return Grammar(spec, vocab)

    specs = [Spec("regex", f"[a-c]{{{n}}}") for n in range(1, 6)]
    one = GrammarCache.cost(GrammarCache.key(specs[0]), Grammar(specs[0], vocab))  # each costs about this
    cache = GrammarCache(max_bytes=3 * one + 100, max_entries=10)
    first = cache.get(specs[0], build)
    assert cache.get(Spec("regex", "[a-c]{1}"), build) is first and len(built) == 1  # by text
    for spec in specs[1:]:
        cache.get(spec, build)
    assert len(cache._done) == 3 and cache.bytes <= 3 * one + 100  # the least recently used went first
    assert cache.get(specs[0], build) is not first and len(built) == 6
    bad = Spec("regex", "[a-")
    for _ in range(2):  # a refusal is remembered too
        with pytest.raises(GrammarError, match="unclosed"):
            cache.get(bad, build)
    assert len(built) == 7
    few = GrammarCache(max_entries=2)
    for spec in specs[:3]:
        few.get(spec, build)
    assert len(few._done) == 2
    small = GrammarCache(max_bytes=one // 2)
    small.get(specs[1], build)
    assert small.bytes == 0 and not small._done  # larger than the bound: not kept


@pytest.mark.parametrize("source", ["[" * 5000 + "]" * 5000, DEEP])
def test_depth_is_checked_however_a_schema_comes(llama, source):
    """A Spec made by hand (the Python API's grammar=, the CLI) gets the same check as a request."""
    with pytest.raises(GrammarError, match=r"^json_schema: nested deeper than 64 levels$"):
        Grammar.compile(Spec("json_schema", source), llama.tokenizer)
    with pytest.raises(RequestError, match=r"^grammar: cannot be compiled: json_schema: nested deeper"):
        llama.create_completion("Hi", grammar=Spec("json_schema", source))
