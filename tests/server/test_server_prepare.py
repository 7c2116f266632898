"""Structured output made ready before the scheduler sees it (issue 19, cases 1-5), against a real
`llama2 serve`: a big schema compiles on its own thread while other requests go on at their usual
pace; what llguidance would refuse (recursive $ref, too many optional properties, schemas nested
too deep, as objects or as JSON text) is a 400 naming the field, streamed or not, before any 200;
llama.cpp's GBNF `grammar` is honoured. In-process: the compile queue is bounded (503 with
Retry-After) and a compile still waiting when its client leaves never runs."""

import asyncio
import json
import re
import threading
import time

import pytest

from server_helpers import http_fixture, serve_fixture

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
pytest.importorskip("pydantic")

MODEL = "stories260K"
HEAVY_PROPERTIES = 10_000
SLACK_S = 0.5  # how much longer a request may take while a big schema compiles

server = serve_fixture("--max-batch", "4")
http = http_fixture("unused")  # the server has no key: the header is ignored


def heavy_schema(tag: str, n: int = HEAVY_PROPERTIES, required: bool = True) -> dict:
    """An object with n integer properties (~270 KB at 10,000): all required compiles (in seconds),
    all optional is refused. `tag` makes each test's schema new to the server's grammar cache."""
    names = [f"{tag}{i}" for i in range(n)]
    schema = {"type": "object", "properties": {k: {"type": "integer"} for k in names}}
    if required:
        schema["required"] = names
    return schema


def json_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def completion(prompt="Once upon a time", **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}], **fields}


@pytest.mark.slow  # a schema that compiles for seconds
def test_a_compiling_schema_stalls_nobody(http):
    def health():
        r = http.get("/health")
        assert r.status_code == 200

    def fifty_tokens():
        r = http.post("/v1/completions", json=completion(max_tokens=50, temperature=0, stop=None))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0

    def slowest(fn, times=3) -> float:
        worst = 0.0
        for _ in range(times):
            t0 = time.perf_counter()
            fn()
            worst = max(worst, time.perf_counter() - t0)
        return worst

    fifty_tokens()  # warm
    alone = slowest(health), slowest(fifty_tokens)

    heavy = {}

    def send_heavy():
        body = chat(max_tokens=4, response_format=json_format(heavy_schema("stall")))
        heavy["response"] = http.post("/v1/chat/completions", json=body)
        heavy["end"] = time.perf_counter()

    sender = threading.Thread(target=send_heavy)
    sender.start()
    time.sleep(0.3)  # its body is read and parsed; the compile runs
    during = slowest(health), slowest(fifty_tokens)
    measured = time.perf_counter()
    sender.join(120)
    assert heavy["response"].status_code == 200, heavy["response"].text
    assert heavy["end"] > measured, "the schema compiled before the measurements ended: nothing was tested"
    assert during[0] <= alone[0] + SLACK_S, (alone, during)
    assert during[1] <= alone[1] + SLACK_S, (alone, during)


RECURSIVE = {
    "root": {"$ref": "#"},
    "property_to_root": {"type": "object", "properties": {"child": {"$ref": "#"}}},
    "mutual_defs": {"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/b"}},
                              "b": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}}},
                    "$ref": "#/$defs/a"},
}

REFUSED = {
    **{f"recursive_{k}": (json_format(v), "response_format", "recursive") for k, v in RECURSIVE.items()},
    "too_many_optional": (json_format(heavy_schema("opt", required=False)), "response_format", "optional properties"),
    "deep_string_json_object": ({"type": "json_object", "schema": "[" * 5000 + "]" * 5000},
                                "response_format.schema", "deeper than 64"),
    "deep_string_json_schema": (json_format("[" * 5000 + "]" * 5000), "response_format.json_schema.schema",
                                "deeper than 64"),
    "not_a_schema_string": (json_format("{not json"), "response_format.json_schema.schema", "not valid JSON"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_schemas_get_a_400_before_any_answer(server, http, case, endpoint, stream):
    fmt, param, words = REFUSED[case]
    body = (completion if endpoint == "/v1/completions" else chat)(max_tokens=8, stream=stream, response_format=fmt)
    r = http.post(endpoint, json=body)
    assert r.status_code == 400, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "\n" not in error["message"]
    assert "Traceback" not in server.stderr and "BaseException" not in server.stderr


GBNF = 'root ::= answer " " animal\nanswer ::= "yes" | "no" | "maybe"\nanimal ::= "cat" | "dog" | [0-9]+ " birds"'
GBNF_RE = re.compile(r"(yes|no|maybe) (cat|dog|[0-9]+ birds)")


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_gbnf_grammar_is_followed(http, endpoint):
    make = completion if endpoint == "/v1/completions" else chat
    for seed in range(1, 9):
        r = http.post(endpoint, json=make(grammar=GBNF, seed=seed, temperature=1.0, max_tokens=40))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert GBNF_RE.fullmatch(text) and choice["finish_reason"] == "stop", choice


def test_gbnf_grammar_streamed(http):
    with http.stream("POST", "/v1/completions", json=completion(grammar=GBNF, seed=3, max_tokens=40,
                                                                 stream=True)) as r:
        assert r.status_code == 200
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in map(json.loads, lines[:-1]))
    assert GBNF_RE.fullmatch(text), text


@pytest.mark.parametrize("grammar,fmt,words", [
    ("root ::= missing", None, "cannot be compiled"),
    ("root ::= [a-", None, "cannot be compiled"),
    (17, None, "expected a GBNF grammar"),
    ('root ::= "a"', {"type": "json_object"}, "not both"),
])
def test_bad_grammar_gets_a_400(http, grammar, fmt, words):
    for stream in (False, True):
        r = http.post("/v1/completions", json=completion(grammar=grammar, response_format=fmt, stream=stream))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "grammar" and words in error["message"], error


# -- in-process: the compile queue's bound, and a client that leaves --------------------------------

@pytest.mark.slow
def test_compile_queue_is_bounded(llama):
    from starlette.testclient import TestClient

    from llama2.server.app import create_app
    from llama2.server.config import ServerConfig

    app = create_app(llama, ServerConfig(model_name=MODEL, prepare_threads=1, max_compiles=1, retry_after_s=3))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        first = {}
        body = chat(max_tokens=2, response_format=json_format(heavy_schema("queue")))
        sender = threading.Thread(target=lambda: first.update(r=c.post("/v1/chat/completions", json=body)))
        sender.start()
        compilers = app.state.server.prepare.compilers
        deadline = time.monotonic() + 30
        while compilers.pending == 0 and "r" not in first and time.monotonic() < deadline:
            time.sleep(0.005)
        assert compilers.pending == 1, "the first schema never reached the compile queue"
        r = c.post("/v1/completions", json=completion(response_format=json_format(heavy_schema("other", 50))))
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert r.json()["error"]["code"] == "server_busy"
        r = c.post("/v1/completions", json=completion(max_tokens=2))  # no grammar: not queued there
        assert r.status_code == 200
        sender.join(120)
        assert first["r"].status_code == 200, first["r"].text
        assert compilers.pending == 0


def test_a_compile_whose_client_left_never_runs(llama):
    from llama2.server import protocol as P
    from llama2.server.prepare import Preparer
    from llama2.structured import GrammarCache, Spec, Vocabulary

    prepare = Preparer(llama.tokenizer, llama.config.vocab_size, threads=1, max_parses=4, max_compiles=4,
                       retry_after_s=1)
    release = threading.Event()
    prepare.compilers.submit(release.wait)  # the one compiling thread is busy
    schema = {"type": "object", "properties": {"left": {"type": "integer"}}, "required": ["left"]}
    req = P.parse_completion(completion(response_format=json_format(schema)), llama.tokenizer, llama.config)

    async def gone():
        return {"type": "http.disconnect"}

    async def ask():
        with pytest.raises(P.APIError) as e:
            await prepare.structure(req, gone)
        return e.value

    error = asyncio.run(ask())
    assert error.status == 499
    release.set()
    prepare.compilers.executor.shutdown(wait=True)
    prepare.close()
    assert prepare.compilers.pending == 0
    key = GrammarCache.key(Spec("json_schema", schema, strict=False))
    cache = Vocabulary.of(llama.tokenizer, llama.config.vocab_size).grammars
    assert key not in cache._done and key not in cache._building


def test_parse_queue_is_bounded(llama):
    from llama2.server import protocol as P
    from llama2.server.prepare import Preparer

    prepare = Preparer(llama.tokenizer, llama.config.vocab_size, threads=1, max_parses=2, max_compiles=1,
                       retry_after_s=5)
    release = threading.Event()

    async def ask():
        busy = [asyncio.ensure_future(prepare.run(release.wait)) for _ in range(2)]  # one runs, one waits
        await asyncio.sleep(0)
        with pytest.raises(P.APIError) as e:
            await prepare.run(len, "x")
        release.set()
        assert await asyncio.gather(*busy) == [True, True]
        return e.value, await prepare.run(len, "xy")  # room again

    error, answer = asyncio.run(ask())
    prepare.close()
    assert error.status == 503 and error.headers == {"Retry-After": "5"} and error.code == "server_busy"
    assert answer == 2 and prepare.parsers.pending == 0


class FailsAfter:
    """A matcher that allows every token for `steps` steps, then raises `error` (as a bug would)."""

    def __init__(self, steps, error):
        self.steps, self.error, self.done = steps, error, False

    def mask(self, logits):
        if self.steps == 0:
            raise self.error
        return logits

    def advance(self, token):
        self.steps -= 1

    def close(self):
        pass


@pytest.mark.parametrize("error,status", [(RuntimeError("a bug"), 500),
                                          ("grammar", 400)])  # a llguidance limit met mid-answer
def test_a_failure_mid_stream_ends_it_cleanly(llama, monkeypatch, error, status):
    """Streamed: a 200, the text so far, an error event with the status, [DONE]; no exception
    escapes the app (it once raised None: "exceptions must derive from BaseException")."""
    from starlette.testclient import TestClient

    from llama2.server import prepare
    from llama2.server.app import create_app
    from llama2.server.config import ServerConfig
    from llama2.structured import GrammarError

    if error == "grammar":
        error = GrammarError("structured output: Current row has 2007 items; max is 2000")
    monkeypatch.setattr(prepare, "constraint_of", lambda params, tokenizer: FailsAfter(3, error))
    app = create_app(llama, ServerConfig(model_name=MODEL))
    with TestClient(app, base_url="http://127.0.0.1") as c:  # raises whatever the app raises
        body = completion(grammar='root ::= [a-z ]+', max_tokens=20, stream=True, temperature=0)
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        events = [json.loads(ln) for ln in lines[:-1]]
        assert "".join(e["choices"][0]["text"] for e in events[:-1])  # what came before
        assert events[-1]["error"]["type"] == ("server_error" if status == 500 else "invalid_request_error")
        if status == 400:
            assert events[-1]["error"]["param"] == "grammar" and "2007 items" in events[-1]["error"]["message"]
        body["stream"] = False
        r = c.post("/v1/completions", json=body)
        assert r.status_code == status and r.json()["error"]["message"]
        metrics = c.get("/metrics").text
        assert f'llama2_requests_total{{endpoint="completions",outcome="{status}"}} 2' in metrics
