"""`llama2 serve` under faults: bad requests get their status and an OpenAI error object naming the
field, a dropped stream frees its slot, a full server answers 503, SIGTERM shuts down cleanly; the
server keeps serving after each."""

import json
import threading

import pytest

from server_helpers import JSON, Server, http_fixture, metric, serve_fixture

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "stories260K"
KEY = "sekret-key"
LONG = {"model": MODEL, "prompt": "Tom", "max_tokens": 500, "temperature": 0}  # greedy: no EOS for 400+


server = serve_fixture("--max-batch", "1", "--max-queue", "1", "--api-key", KEY, "--max-body", "4096")
http = http_fixture(KEY)


def ok(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Lily", "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "prompt": "a", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "a", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "seed": 1.5}, "seed"),
    ({"model": MODEL, "prompt": "a", "stop": [1]}, "stop"),
    ({"model": MODEL, "prompt": "a", "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": "a", "n": 2}, "n"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": {"text": "a"}}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"prompt": "a"}, "model"),
    ({"model": MODEL, "prompt": "a", "logprobs": 6}, "logprobs"),
    ({"model": MODEL, "prompt": "a", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectt"}}}}, "response_format"),
])
def test_bad_completion_fields(http, body, param):
    assert error(http.post("/v1/completions", json=body), 400)["param"] == param


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1]"),
    (["hi"], "messages[0]"),
])
def test_bad_chat_fields(http, messages, param):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert error(r, 400)["param"] == param


def test_non_finite_numbers(http):
    body = b'{"model": "%s", "prompt": "a", "temperature": NaN}' % MODEL.encode()
    assert error(http.post("/v1/completions", content=body, headers=JSON), 400)["param"] == "temperature"


def test_bad_json_unknown_model_big_body(http):
    assert error(http.post("/v1/completions", content=b"{not json", headers=JSON), 400)["param"] == "body"
    assert error(http.post("/v1/completions", content=b"[1, 2]", headers=JSON), 400)["param"] == "body"
    r = http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]})
    assert error(r, 404)["code"] == "model_not_found"
    assert error(http.get("/v1/models/gpt-4"), 404)["param"] == "model"
    assert error(http.get("/v1/engines"), 404)["code"] == "not_found"
    assert error(http.get("/v1/completions"), 405)
    big = {"model": MODEL, "prompt": "x" * 5000}
    assert error(http.post("/v1/completions", json=big), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield json.dumps(big).encode()
    assert error(http.post("/v1/completions", content=chunked(), headers=JSON), 413)["code"] == "request_too_large"
    ok(http)


def test_api_key(server, http):
    with httpx.Client(base_url=server.base, timeout=60) as anon:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
        assert error(anon.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer " + KEY[:-1] + "X"}
        assert error(anon.post("/v1/completions", json=body, headers=wrong), 401)["code"] == "invalid_api_key"
        assert error(anon.get("/v1/models", headers={"Authorization": KEY}), 401)
        assert error(anon.get("/metrics"), 401)
        assert anon.get("/health").status_code == 200  # for load balancers: no key needed
    assert http.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_dropped_stream_frees_its_slot(server, http):
    generated = metric(http.get("/metrics").text, "llama2_generated_tokens_total")
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):  # a few tokens in, then hang up
            next(lines)
    health = server.wait_idle(http)
    assert health["active"] == 0
    page = http.get("/metrics").text
    assert metric(page, 'llama2_requests_total{endpoint="scheduler",outcome="cancelled"}') >= 1
    assert metric(page, "llama2_generated_tokens_total") - generated < LONG["max_tokens"]
    ok(http)  # the one slot is free again


def test_full_server_answers_503(server):
    """One slot, one queue place: of 8 long requests sent at the same moment, some are refused."""
    statuses, lock, n = [], threading.Lock(), 8
    barrier = threading.Barrier(n)

    def send():
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            c.get("/health")  # connected before the race starts
            barrier.wait(60)
            r = c.post("/v1/completions", json=LONG)
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=send) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    busy = [s for s in statuses if s[0] == 503]
    assert len(statuses) == n and {s[0] for s in statuses} == {200, 503}
    assert busy[0][1] == "1" and busy[0][2]["error"]["code"] == "server_busy"
    assert n - len(busy) >= 2  # the running one and the queued one


def test_sigterm_finishes_requests_in_flight():
    s = Server("--max-batch", "2")
    try:
        with httpx.Client(base_url=s.base, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 200, "stream": True}) as r:
                lines = r.iter_lines()
                next(lines)
                s.proc.send_signal(15)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            finish = json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"]
            assert finish == "length"
        assert s.proc.wait(60) == 0
        assert "Traceback" not in s.stderr and "stopped" in s.stderr
    finally:
        s.terminate()


def test_client_leaving_a_plain_request_cancels_it(server, http):
    page = http.get("/metrics").text
    cancelled = metric(page, 'llama2_requests_total{endpoint="scheduler",outcome="cancelled"}')
    generated = metric(page, "llama2_generated_tokens_total")
    with pytest.raises(httpx.TimeoutException):  # gives up and closes the connection
        http.post("/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.02))  # well before 500 tokens
    server.wait_idle(http)
    page = http.get("/metrics").text
    assert metric(page, 'llama2_requests_total{endpoint="scheduler",outcome="cancelled"}') == cancelled + 1
    assert metric(page, "llama2_generated_tokens_total") - generated < LONG["max_tokens"]
    ok(http)


@pytest.mark.parametrize("flags,message", [
    (["--max-batch", "0"], "--max-batch 0"),
    (["--max-queue", "-1"], "--max-queue -1"),
    (["--threads", "0"], "--threads 0"),
    (["--chat-template", "nope"], "--chat-template 'nope'"),
])
def test_serve_usage_errors(flags, message):
    import io
    from conftest import asset
    from llama2.cli import main
    err = io.StringIO()
    assert main(["serve", str(asset("stories260K.bin")), *flags], stdout=io.BytesIO(), stderr=err) == 2
    assert message in err.getvalue() and "Traceback" not in err.getvalue()


def test_port_in_use_is_one_line(server):
    import io
    from conftest import asset
    from llama2.cli import main
    port = server.base.rsplit(":", 1)[1]
    err = io.StringIO()
    code = main(["serve", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "--port", port],
                stdout=io.BytesIO(), stderr=err)
    assert code == 1 and f"--port {port}: cannot listen there" in err.getvalue()
