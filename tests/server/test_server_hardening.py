"""Issue 13: every bad request gets a clean 4xx, the event loop never blocks, idle and slow clients
are disconnected, outcomes are counted as they happened. Each numbered case of the issue is a named
test here; the app runs in-process (starlette's TestClient) or under real uvicorn (`llama2 serve`)
where the connection itself matters."""

import json
import socket
import threading
import time

import pytest

from conftest import asset
from server_helpers import JSON, Server, metric, serve_fixture

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("pydantic")

MODEL = "stories260K"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
class SlowTokenizer:
    """The real tokenizer, except that `encode` of a text marked SLOW waits for `release` (at most
    30 s), with `started` set while it waits: a stand-in for a 1 MB prompt being tokenized."""
    MARK = "SLOW:"

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.started, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, *args, **kwargs):
        if isinstance(text, str) and text.startswith(self.MARK):
            self.started.set()
            self.release.wait(30)
            text = text[len(self.MARK):]
        return self.inner.encode(text, *args, **kwargs)


@pytest.fixture(scope="module")
def app_and_tokenizer(llama):
    from llama2 import Llama
    from llama2.server.app import create_app
    from llama2.server.config import ServerConfig

    slow = SlowTokenizer(llama.tokenizer)
    served = Llama(llama.model, slow, llama.checkpoint)
    config = ServerConfig(model_name=MODEL, max_batch=2, max_queue=4, max_body=4 << 20)
    return create_app(served, config), slow


@pytest.fixture(scope="module")
def client(app_and_tokenizer):
    from starlette.testclient import TestClient
    with TestClient(app_and_tokenizer[0], base_url="http://127.0.0.1") as c:
        yield c


def error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def greedy_text(client, prompt="Lily", n=12):
    r = client.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# -- 1. lone surrogates -----------------------------------------------------------------------------

def test_case1_lone_surrogate_is_a_400_naming_the_field(client):
    body = b'{"model": "%s", "prompt": "a\\ud800b"}' % MODEL.encode()
    e = error(client.post(COMPLETIONS, content=body, headers=JSON), 400)
    assert e["param"] == "prompt" and "lone surrogate" in e["message"]
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\udfffb"}]}' % MODEL.encode()
    e = error(client.post(CHAT, content=body, headers=JSON), 400)
    assert e["param"] == "messages[0].content" and "Error" not in e["message"]
    body = b'{"model": "%s", "prompt": "a", "stop": ["\\ud800"]}' % MODEL.encode()
    assert error(client.post(COMPLETIONS, content=body, headers=JSON), 400)["param"] == "stop"
    body = b'{"model": "%s", "prompt": "a", "logit_bias": {"\\ud800": 1e9}}' % MODEL.encode()
    param = error(client.post(COMPLETIONS, content=body, headers=JSON), 400)["param"]
    assert param.startswith("logit_bias[") and param.encode("utf-8")  # a client's key, made printable
    body = b'{"model": "\\ud800"}'
    assert error(client.post(COMPLETIONS, content=body, headers=JSON), 404)["param"] == "model"


# -- 2. integers too large for a float ----------------------------------------------------------------

@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty",
                                   "max_tokens", "seed", "n"])
def test_case2_huge_integers_are_a_400(client, field):
    body = '{"model": "%s", "prompt": "a", "%s": 1%s}' % (MODEL, field, "0" * 400)
    e = error(client.post(COMPLETIONS, content=body.encode(), headers=JSON), 400)
    assert e["param"] == field and "Overflow" not in e["message"]


# -- 3. deep nesting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [100, 100_000])
def test_case3_deep_nesting_is_a_400(client, depth):
    body = '{"model": "%s", "prompt": "a", "extra": %s%s}' % (MODEL, "[" * depth, "]" * depth)
    e = error(client.post(COMPLETIONS, content=body.encode(), headers=JSON), 400)
    assert e["param"] == "body" and "nested" in e["message"]


# -- 4. tiny temperatures ----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-30])
@pytest.mark.parametrize("top_p", [None, 1])
def test_case4_tiny_temperature_is_greedy(client, temperature, top_p):
    greedy = greedy_text(client)
    body = {"model": MODEL, "prompt": "Lily", "max_tokens": 12, "temperature": temperature}
    if top_p is not None:
        body["top_p"] = top_p
    r = client.post(COMPLETIONS, json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == greedy


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_case4_non_finite_temperature_is_a_400(client, literal):
    body = b'{"model": "%s", "prompt": "a", "temperature": %s}' % (MODEL.encode(), literal)
    assert error(client.post(COMPLETIONS, content=body, headers=JSON), 400)["param"] == "temperature"


# -- 5. nothing heavy on the event loop --------------------------------------------------------------

def test_case5_health_and_generation_answer_while_a_prompt_is_tokenized(client, app_and_tokenizer):
    slow = app_and_tokenizer[1]
    slow.started.clear()
    slow.release.clear()
    result = {}

    def big():
        result["r"] = client.post(COMPLETIONS, json={"model": MODEL, "prompt": SlowTokenizer.MARK + "Tom",
                                                     "max_tokens": 2})
    t = threading.Thread(target=big)
    t.start()
    try:
        assert slow.started.wait(30), "the tokenizer never ran"
        health = client.get("/health")
        other = greedy_text(client, "Lily", 4)  # a whole generation while the other is tokenized
        still_tokenizing = not slow.release.is_set() and "r" not in result
    finally:
        slow.release.set()
        t.join(60)
    assert health.status_code == 200 and other
    assert still_tokenizing, "/health waited for the tokenizer: it ran on the event loop"
    assert result["r"].status_code == 200


def test_case5_a_1mb_prompt_is_refused_before_tokenizing(client):
    r = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "Once upon a time " * 62_000})
    e = error(r, 400)
    assert e["code"] == "context_length_exceeded" and "at least" in e["message"]
    r = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * (1 << 20)}]})
    assert error(r, 400)["code"] == "context_length_exceeded"


# -- 8. smaller ones ---------------------------------------------------------------------------------

def test_case8_405_carries_allow(client):
    r = client.get(COMPLETIONS)
    error(r, 405)
    assert r.headers["allow"] == "POST"
    r = client.post("/health")
    assert set(error(r, 405) and r.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_case8_trailing_slash_is_answered_without_a_redirect(client):
    r = client.get("/v1/models/", headers={"Host": "localhost:9"}, follow_redirects=False)
    assert r.status_code == 200 and "location" not in r.headers
    assert r.json()["data"][0]["id"] == MODEL
    r = client.post(COMPLETIONS + "/", json={"model": MODEL, "prompt": "a", "max_tokens": 1},
                    headers={"Host": "localhost:9"}, follow_redirects=False)
    assert r.status_code == 200 and "location" not in r.headers
    r = client.get("/nowhere/", headers={"Host": "localhost:9"}, follow_redirects=False)
    assert error(r, 404) and "location" not in r.headers


def test_case8_503_message_states_the_real_limits():
    from llama2.server.scheduler import Params, QueueFull, Scheduler

    from conftest import TINY
    from llama2.kvcache import Cache

    class Model:
        config = TINY

        def new_cache(self, slots, blocks):
            return Cache(TINY, "f32", slots, None, blocks)
    s = Scheduler(Model(), None, max_batch=1, max_queue=1, kv_budget=128)  # not started: nothing runs
    p = Params(prompt=(1,), max_tokens=20, temperature=0.0, top_p=0.9, seed=1)
    s.submit(p, print)
    s.submit(p, print)
    with pytest.raises(QueueFull) as e:
        s.submit(p, print)
    assert str(e.value) == ("1 running, 1 waiting (limit 1); KV cache: 2 of 8 blocks of 16 positions "
                            "promised, max batch 1")


@pytest.mark.parametrize("endpoint,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "logprobs": 1}, "logprobs"),
    (COMPLETIONS, {"prompt": "a", "logprobs": True}, "logprobs"),
    (COMPLETIONS, {"prompt": "a", "logprobs": 6}, "logprobs"),
    (COMPLETIONS, {"prompt": "a", "logprobs": 1, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "yaml"}},
     "response_format.type"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}]}, None),
    (CHAT, {"messages": [{"content": "a"}]}, "messages[0].role"),
])
def test_case8_logprobs_and_response_format_are_validated(client, endpoint, body, param):
    if param is None:  # the valid request these cases vary
        assert client.post(endpoint, json={"model": MODEL, "max_tokens": 2, **body}).status_code == 200
        return
    e = error(client.post(endpoint, json={"model": MODEL, **body}), 400)
    assert e["param"] == param and e["message"].startswith(param + ":")


def test_text_response_format_and_false_logprobs_are_accepted(client):
    r = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                                "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0})
    assert r.status_code == 200, r.text


def test_error_bodies_carry_no_exception_text(client):
    for body in [b"{not json", b"\xff\xfe", b'{"prompt": 1' + b"0" * 5000 + b"}", b"[" * 5000]:
        e = error(client.post(COMPLETIONS, content=body, headers=JSON), 400)
        assert e["param"] == "body"
        assert not any(word in e["message"] for word in ("Error", "Expecting", "codec", "Traceback"))


# -- 6, 7 and metrics under real uvicorn -------------------------------------------------------------

TIMEOUT_FLAGS = ("--timeout-headers", "1", "--timeout-body", "1", "--timeout-keep-alive", "1")


server = serve_fixture("--max-batch", "2", *TIMEOUT_FLAGS)


def connect(server) -> socket.socket:
    host, port = server.base[len("http://"):].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def closed_by_server(sock, deadline_s=30.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded: a generous deadline)."""
    sock.settimeout(deadline_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_case6_disconnect_during_upload_is_a_499(server):
    with httpx.Client(base_url=server.base, timeout=30) as http:
        before = metric(http.get("/metrics").text, 'llama2_requests_total{endpoint="completions",outcome="499"}')
        sock = connect(server)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"model": ')
        time.sleep(0.2)
        sock.close()
        for _ in range(200):  # the server notices asynchronously
            page = http.get("/metrics").text
            if metric(page, 'llama2_requests_total{endpoint="completions",outcome="499"}') > before:
                break
            time.sleep(0.05)
        assert metric(page, 'llama2_requests_total{endpoint="completions",outcome="499"}') == before + 1
        assert metric(page, 'llama2_requests_total{endpoint="completions",outcome="500"}') == 0
        assert http.get("/health").status_code == 200
    assert "Traceback" not in server.stderr and "unexpected error" not in server.stderr


@pytest.mark.slow  # waits out the server's timeouts
@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_case7_idle_and_half_header_connections_are_closed(server, sent):
    sock = connect(server)
    sock.sendall(sent)
    assert closed_by_server(sock) == b""
    sock.close()


@pytest.mark.slow  # waits out the server's timeouts
def test_case7_slow_header_is_closed_however_it_trickles(server):
    sock = connect(server)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    closed = False
    try:
        for i in range(len(request)):  # one byte each 0.05 s: 12 s for all, deadline 1 s
            sock.sendall(request[i:i + 1])
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    if not closed:
        closed = closed_by_server(sock, 5) == b""
    sock.close()
    assert closed and i < len(request) - 1


@pytest.mark.slow  # waits out the server's timeouts
def test_case7_slow_body_gets_408_and_is_closed(server):
    sock = connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b"{" * 10)
    data = closed_by_server(sock)
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.slow  # waits out the server's timeouts
def test_case7_idle_keep_alive_is_closed(server):
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = closed_by_server(sock)  # the response, then the close after --timeout-keep-alive
    sock.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"}")


def test_case8_cancelled_streams_are_not_counted_ok(server):
    with httpx.Client(base_url=server.base, timeout=30) as http:
        page = http.get("/metrics").text
        ok = metric(page, 'llama2_requests_total{endpoint="completions",outcome="ok"}')
        gone = metric(page, 'llama2_requests_total{endpoint="completions",outcome="499"}')
        body = {"model": MODEL, "prompt": "Tom", "max_tokens": 400, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        server.wait_idle(http)
        for _ in range(200):
            page = http.get("/metrics").text
            if metric(page, 'llama2_requests_total{endpoint="completions",outcome="499"}') > gone:
                break
            time.sleep(0.05)
        assert metric(page, 'llama2_requests_total{endpoint="completions",outcome="499"}') == gone + 1
        assert metric(page, 'llama2_requests_total{endpoint="completions",outcome="ok"}') == ok
        with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 3}) as r:
            assert list(r.iter_lines())[-2] == "data: [DONE]"
        page = http.get("/metrics").text
        assert metric(page, 'llama2_requests_total{endpoint="completions",outcome="ok"}') == ok + 1


def test_connection_cap():
    s = Server("--max-connections", "2")
    try:
        idle = connect(s)  # holds one of the two
        with httpx.Client(base_url=s.base, timeout=30) as http:
            r = http.get("/health")
            assert r.status_code == 503
        idle.close()
        for _ in range(200):  # the server notices the close asynchronously
            with httpx.Client(base_url=s.base, timeout=30) as http:
                if http.get("/health").status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the cap did not free up")
    finally:
        assert s.terminate() == 0, s.stderr


def test_serve_flags_are_checked():
    import io
    from llama2.cli import main
    for flags, message in [(["--timeout-body", "0"], "--timeout-body 0.0"),
                           (["--timeout-headers", "nan"], "--timeout-headers nan"),
                           (["--max-connections", "0"], "--max-connections 0")]:
        err = io.StringIO()
        assert main(["serve", str(asset("stories260K.bin")), *flags], stdout=io.BytesIO(), stderr=err) == 2
        assert message in err.getvalue() and err.getvalue().count("\n") == 1
