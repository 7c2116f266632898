"""Structured output and logprobs through `llama2 serve` and the official openai client: 20 seeded
samples per schema at temperature 1 validate, streamed too, under concurrent requests; a schema
that cannot be compiled gets a 400; the server's answers equal the Python API's for the same
seeded requests (one code path)."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from server_helpers import openai_fixture, serve_fixture
from structured_cases import REGEXES, SCHEMAS, json_format

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "stories260K"
SAMPLES = 20
MAX_TOKENS = 256
CHAT = [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Describe a dog."}]


server = serve_fixture("--max-batch", "4")
client = openai_fixture()


def concurrently(fn, seeds):
    with ThreadPoolExecutor(4) as pool:  # 4 at once: constrained sequences share batched passes
        return list(pool.map(fn, seeds))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_chat_json_schema_samples_validate(client, name):
    schema = SCHEMAS[name]

    def ask(seed):
        return client.chat.completions.create(model=MODEL, messages=CHAT, seed=seed, temperature=1.0,
                                              max_tokens=MAX_TOKENS, response_format=json_format(name, schema))

    for r in concurrently(ask, range(1, SAMPLES + 1)):
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.parametrize("name", ["nested", "number_ranges", "top_level_array"])
def test_completion_json_schema_samples_validate(client, name):
    schema = SCHEMAS[name]

    def ask(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", seed=seed, temperature=1.0,
                                         max_tokens=MAX_TOKENS,
                                         extra_body={"response_format": json_format(name, schema)})

    for r in concurrently(ask, range(1, SAMPLES + 1)):
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].text), schema)


@pytest.mark.parametrize("name", ["optional_fields", "array_bounds"])
def test_streamed_json_schema_samples_validate(client, name):
    schema = SCHEMAS[name]

    def ask(seed):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=CHAT, seed=seed, temperature=1.0, max_tokens=MAX_TOKENS, stream=True,
            response_format=json_format(name, schema)))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].choices[0].finish_reason

    for text, finish in concurrently(ask, range(1, SAMPLES + 1)):
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_json_object(client):
    for seed in range(1, 6):
        r = client.chat.completions.create(model=MODEL, messages=CHAT, seed=seed, max_tokens=MAX_TOKENS,
                                           response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_regex_in_a_json_schema_string(client):
    # a regex through the server: a JSON string with a pattern (OpenAI's API has no raw regex field)
    regex = REGEXES[1]
    schema = {"type": "string", "pattern": "^" + regex + "$"}
    for seed in range(1, SAMPLES + 1):
        r = client.completions.create(model=MODEL, prompt="Answer:", seed=seed, max_tokens=MAX_TOKENS,
                                      extra_body={"response_format": json_format("answer", schema)})
        assert r.choices[0].finish_reason == "stop"
        assert re.fullmatch(regex, json.loads(r.choices[0].text)), r.choices[0].text


@pytest.mark.parametrize("schema,words", [
    ({"type": "objectt"}, "objectt"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "string", "pattern": "[a-"}, "regex"),
])
def test_schema_that_cannot_be_compiled_is_a_400(client, schema, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                       response_format=json_format("bad", schema))
    body = e.value.body
    assert e.value.status_code == 400 and body["param"] == "response_format"
    assert body["message"].startswith("response_format: cannot be compiled: json_schema: ") and words in body["message"]


def test_strict_false_accepts_what_strict_refuses(client):
    schema = {"type": "string", "maxLength": 6, "format": "no-such-format"}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": False}}
    r = client.chat.completions.create(model=MODEL, messages=CHAT, seed=2, max_tokens=40, response_format=fmt)
    assert len(json.loads(r.choices[0].message.content)) <= 6


def _equal(a, b, key=None) -> bool:
    """Equal, except that a "logprob" may differ by 1e-5: the server reuses the KV blocks of a prompt
    it has seen (prefix cache), which may change a logit in its last bits (docs/server.md)."""
    if key == "logprob":
        return abs(a - b) <= 1e-5
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k], k) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _same(server_answer: dict, api_answer: dict):
    for answer in (server_answer, api_answer):
        answer.pop("id"), answer.pop("created")
        answer.pop("system_fingerprint", None)
        answer.get("usage", {}).pop("prompt_tokens_details", None)  # the server's prefix cache state
    assert _equal(server_answer, api_answer), (server_answer, api_answer)


@pytest.mark.parametrize("kwargs", [
    {"seed": 11, "max_tokens": 40},
    {"seed": 12, "max_tokens": 30, "temperature": 0.7, "top_p": 0.5, "stop": [" the"]},
    {"seed": 13, "max_tokens": 25, "logprobs": True, "top_logprobs": 3},
    {"seed": 14, "max_tokens": MAX_TOKENS, "response_format": json_format("nested", SCHEMAS["nested"])},
])
def test_chat_equals_python_api(server, llama, kwargs):
    import httpx
    body = {"model": MODEL, "messages": CHAT, **kwargs}
    served = httpx.post(server.url + "/chat/completions", json=body, timeout=60).json()
    _same(served, llama.create_chat_completion(CHAT, **kwargs))
    streamed = [json.loads(line[6:]) for line in httpx.post(
        server.url + "/chat/completions", json={**body, "stream": True}, timeout=60).text.splitlines()
        if line.startswith("data: {")]
    api_chunks = list(llama.create_chat_completion(CHAT, stream=True, **kwargs))
    assert len(streamed) == len(api_chunks)
    for s, a in zip(streamed, api_chunks):
        _same(s, a)


@pytest.mark.parametrize("kwargs", [
    {"seed": 21, "max_tokens": 30, "logprobs": 2},
    {"seed": 22, "max_tokens": 20, "echo": True, "stop": ["."]},
    {"seed": 23, "max_tokens": MAX_TOKENS, "response_format": json_format("enums", SCHEMAS["enums"])},
])
def test_completion_equals_python_api(server, llama, kwargs):
    import httpx
    body = {"model": MODEL, "prompt": "Once upon a time", **kwargs}
    served = httpx.post(server.url + "/completions", json=body, timeout=60).json()
    _same(served, llama.create_completion("Once upon a time", **kwargs))


def test_logprobs_through_the_openai_client(client, llama):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, seed=5, max_tokens=12, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-12 for c in content)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", seed=5, max_tokens=12, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
