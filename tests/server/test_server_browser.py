"""Issue 19, case 6: a server without a key must not answer any web page. Against a real `llama2
serve`: the Host allow-list (DNS rebinding), JSON-only bodies (no cross-origin text/plain POST),
CORS only with --cors-origins, nosniff on every answer, and limits on a request's head that hold
when the whole request arrives in one read."""

import io
import json
import select
import socket

import pytest

from conftest import asset
from server_helpers import JSON, Server, chromium, metric, serve_fixture

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "stories260K"
COMPLETION = {"model": MODEL, "prompt": "Tom", "max_tokens": 2, "temperature": 0}

server = serve_fixture()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, timeout=30) as c:
        yield c


def port(server) -> int:
    return int(server.base.rsplit(":", 1)[1])


def raw(server, data: bytes, pieces: int = 1) -> bytes:
    """Send `data` on a fresh connection (in one write, or `pieces` writes, reading between them: an
    early answer is read before the server's close can reset the connection) and read the answer
    until the server closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port(server)), timeout=30)
    step = -(-len(data) // pieces)
    answer = b""
    try:
        for i in range(0, len(data), step):
            sock.sendall(data[i:i + step])
            if pieces > 1 and select.select([sock], [], [], 0.02)[0]:
                answer += sock.recv(65536)
                break  # answered early: stop sending
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, BrokenPipeError):  # closed while we were still sending
        pass
    finally:
        sock.close()
    return answer


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "LOCALHOST", "127.0.0.1:1", "localhost:80"])
def test_loopback_names_with_any_port_are_answered(server, http, host):
    r = http.get("/health", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.",
                                  "0.0.0.0", "[::1", "localhost:http", "", "127.0.0.1:1:2"])
def test_other_hosts_get_421(server, http, host):
    for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                               ("POST", "/v1/completions", COMPLETION), ("GET", "/", None)]:
        r = http.request(method, path, json=body, headers={"Host": host})
        assert r.status_code == 421, (host, path, r.text)
        error = r.json()["error"]
        assert error["code"] == "host_not_allowed" and error["param"] == "Host"
        assert "--allowed-hosts" in error["message"]


def test_a_request_without_host_gets_421(server):
    answer = raw(server, b"GET /health HTTP/1.0\r\n\r\n")
    assert status(answer) == 421 and b"Host missing" in answer


@pytest.mark.parametrize("kind", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x", "application/jsonx", None])
def test_bodies_that_are_not_declared_json_get_415(server, http, kind):
    headers = {} if kind is None else {"Content-Type": kind}
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = http.post(path, content=json.dumps(COMPLETION).encode(), headers=headers)
        assert r.status_code == 415, (kind, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"


def test_json_bodies_are_served(server, http):
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = http.post("/v1/completions", content=json.dumps(COMPLETION).encode(), headers={"Content-Type": kind})
        assert r.status_code == 200, (kind, r.text)
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    r = http.post("/health")  # no body: routing answers (405), not the body check
    assert r.status_code == 405


def test_no_cors_without_cors_origins(server, http):
    origin = {"Origin": "http://evil.example"}
    r = http.get("/v1/models", headers=origin)
    assert r.status_code == 200 and not any(k.startswith("access-control-") for k in r.headers)
    r = http.options("/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


def test_nosniff_on_every_answer(server, http):
    answers = [http.get("/health"), http.get("/v1/models"), http.get("/"), http.get("/static/chat.js"),
               http.get("/metrics"), http.get("/nowhere"), http.get("/v1/completions"),
               http.post("/v1/completions", json=COMPLETION),
               http.post("/v1/completions", json={**COMPLETION, "stream": True}),
               http.post("/v1/completions", content=b"{", headers=JSON),
               http.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"}),
               http.get("/health", headers={"Host": "evil.example"})]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 404, 405, 200, 200, 400, 415, 421]
    for r in answers:
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], r.url


def many_headers(n: int) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(n)) + b"\r\n"


@pytest.mark.parametrize("pieces", [1, 40])
def test_5000_headers_are_refused_however_they_arrive(server, pieces):
    answer = raw(server, many_headers(5000), pieces)
    assert status(answer) == 431, answer[:200]
    assert b"x-content-type-options: nosniff" in answer.lower()


def test_101_headers_are_refused_100_are_served(server):
    assert status(raw(server, many_headers(101))) == 431
    assert status(raw(server, many_headers(98).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))) == 200


@pytest.mark.parametrize("pieces", [1, 40])
def test_a_100kb_url_is_refused_however_it_arrives(server, pieces):
    answer = raw(server, b"GET /health?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", pieces)
    assert status(answer) in (414, 431), answer[:200]  # whole: 414; in pieces h11 stops at 16 KiB first
    if pieces == 1:
        assert status(answer) == 414


def test_refusals_log_no_traceback(server, http):
    raw(server, many_headers(5000))
    http.get("/health", headers={"Host": "evil.example"})
    http.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"})
    assert http.get("/health").status_code == 200  # still serving
    assert "Traceback" not in server.stderr


# -- with --allowed-hosts and --cors-origins --------------------------------------------------------

def test_allowed_hosts_and_cors_origins():
    s = Server("--allowed-hosts", "my.example, Other.Example", "--cors-origins", "http://app.example")
    try:
        with httpx.Client(base_url=s.base, timeout=30) as http:
            for host in ("my.example", "other.example:8000", "localhost"):
                assert http.get("/health", headers={"Host": host}).status_code == 200, host
            assert http.get("/health", headers={"Host": "evil.example"}).status_code == 421
            app = {"Origin": "http://app.example"}
            r = http.options("/v1/completions", headers={**app, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "content-type"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
            assert r.headers["x-content-type-options"] == "nosniff"
            r = http.post("/v1/completions", json=COMPLETION, headers=app)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
            r = http.get("/v1/models", headers={"Origin": "http://evil.example"})
            assert "access-control-allow-origin" not in r.headers
            r = http.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
            # the body check still holds for an allowed origin
            r = http.post("/v1/completions", content=b"{}", headers={**app, "Content-Type": "text/plain"})
            assert r.status_code == 415
    finally:
        assert s.terminate() == 0, s.stderr


@pytest.mark.parametrize("names,bound,expected", [
    (None, "127.0.0.1", ("localhost", "127.0.0.1", "::1")),
    (None, "::1", ("localhost", "127.0.0.1", "::1")),
    (None, "0.0.0.0", None),
    (("a.example",), "0.0.0.0", ("localhost", "127.0.0.1", "::1", "a.example")),
    (("a.example", "*"), "127.0.0.1", None),
])
def test_allowed_hosts_by_bound_address(names, bound, expected):
    from llama2.cli.serve import allowed_hosts
    assert allowed_hosts(names, bound) == expected


@pytest.mark.parametrize("flag", ["--allowed-hosts", "--cors-origins"])
def test_empty_name_lists_are_usage_errors(flag):
    from llama2.cli import main
    err = io.StringIO()
    assert main(["serve", str(asset("stories260K.bin")), flag, " , "], stdout=io.BytesIO(), stderr=err) == 2
    assert flag in err.getvalue() and err.getvalue().count("\n") == 1


# -- in a real browser ------------------------------------------------------------------------------

REBIND = "rebind.example"  # resolved to 127.0.0.1 by the browser: a DNS-rebinding name


@pytest.fixture(scope="module")
def other_page(tmp_path_factory):
    """Another web site's page, served from another port (another origin), as the attack's start."""
    import functools
    import http.server
    import threading

    folder = tmp_path_factory.mktemp("other-site")
    (folder / "index.html").write_text("<!doctype html><title>another site</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}/"
    site.shutdown()


def in_page(driver, script, *args):
    """Run `script` (which ends by calling done(result)) in the page and return its result."""
    return driver.execute_async_script("const done = arguments[arguments.length - 1];\n" + script, *args)


@pytest.mark.browser
def test_another_sites_page_cannot_drive_or_read_the_server(server, http, other_page):
    """What the issue's probe found a page could do, done by a page in Chromium: a no-cors text/plain
    POST (no preflight) ran a generation; now it is refused (415) and no completion runs. A JSON
    POST needs a preflight, which is not granted. A DNS-rebinding name gets 421."""
    def count(endpoint):
        return metric(http.get("/metrics").text, f'llama2_requests_total{{endpoint="{endpoint}",outcome="ok"}}')

    with chromium(f"--host-resolver-rules=MAP {REBIND} 127.0.0.1") as d:
        d.set_script_timeout(30)
        d.get(other_page)
        health, completions = count("health"), count("completions")
        # the control: a request from this page does reach the server
        assert in_page(d, "fetch(arguments[0] + '/health', {mode: 'no-cors'}).then(() => done('sent'), "
                          "e => done(String(e)))", server.base) == "sent"
        assert count("health") == health + 1
        body = json.dumps(COMPLETION)
        assert in_page(d, "fetch(arguments[0] + '/v1/completions', {method: 'POST', mode: 'no-cors', "
                          "headers: {'Content-Type': 'text/plain'}, body: arguments[1]})"
                          ".then(() => done('sent'), e => done(String(e)))", server.base, body) == "sent"
        blob = in_page(d, "fetch(arguments[0] + '/v1/completions', {method: 'POST', mode: 'no-cors', "
                          "body: new Blob([arguments[1]])}).then(() => done('sent'), e => done(String(e)))",
                       server.base, body)
        json_post = in_page(d, "fetch(arguments[0] + '/v1/completions', {method: 'POST', "
                               "headers: {'Content-Type': 'application/json'}, body: arguments[1]})"
                               ".then(r => done('read ' + r.status), e => done(String(e)))", server.base, body)
        assert blob == "sent" and json_post.startswith("TypeError"), json_post  # no preflight granted
        server.wait_idle(http)
        assert count("completions") == completions, "a generation ran for another site's page"
        # DNS rebinding: the page's own name now points at the server; the server knows it is not its
        d.get(f"http://{REBIND}:{port(server)}/v1/models")
        assert "host_not_allowed" in d.page_source and MODEL not in d.page_source


# -- a handled error in a stream -----------------------------------------------------------------

def test_a_failed_stream_ends_in_an_error_event_without_a_bogus_exception(llama, caplog):
    """A generation that fails mid-stream (here: the forward pass) gets its error event and
    [DONE]; the stream's end raises nothing (it once raised 'exceptions must derive from
    BaseException' into the server log)."""
    from starlette.testclient import TestClient

    from llama2 import Llama
    from llama2.server.app import create_app
    from llama2.server.config import ServerConfig

    class Failing:
        def __init__(self, model):
            self.inner = model

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def forward_batch(self, segments, cache, all_logits=False, adapters=None):
            raise RuntimeError("injected")

    served = Llama(Failing(llama.model), llama.tokenizer, llama.checkpoint)
    app = create_app(served, ServerConfig(model_name=MODEL))
    with TestClient(app, base_url="http://127.0.0.1") as client:  # raises what the app raises
        with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]" and '"server_error"' in lines[-2]
    assert "must derive from BaseException" not in caplog.text


@pytest.mark.parametrize("value,name", [("localhost", "localhost"), ("LocalHost:8000", "localhost"),
                                        ("[::1]:80", "::1"), ("[::1]", "::1"), ("127.0.0.1:1", "127.0.0.1"),
                                        ("[::1", None), ("a:b", None), ("a:1:2", None), (":80", None), ("", None)])
def test_host_names(value, name):
    from llama2.server.security import allowed_names, host_name
    assert host_name(value) == name
    if name is not None:
        assert allowed_names([value]) == {name}
    assert allowed_names(["::1"]) == {"::1"}
