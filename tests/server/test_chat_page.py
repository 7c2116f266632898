"""The chat page at GET / of `llama2 serve`, in a real headless Chromium against a real server.

The browser is Debian's `chromium`, driven through Debian's `chromium-driver` with selenium: a
well-kept WebDriver client, where the DevTools protocol alone would mean a hand-written websocket
client. Selenium is given both paths and told to stay offline (SE_OFFLINE), so it never downloads a
browser or a driver. Without them (no apt: `.ci/run` installs them) the browser tests skip and say why.

The server is `llama2 serve` on stories260K with an API key, and the page is checked against the
API itself: a seeded request from the page gives exactly the text the API gives for the same body.
Two things a healthy server does not send are fed to the page by replacing `window.fetch` with a
canned event stream: model output full of markdown and HTML, and an error event mid-stream (what
app.py sends when a job fails after the stream began).
"""

import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import REPO
from server_helpers import http_fixture, serve_fixture

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "stories260K"
KEY = "page-test-key"
STORE_KEY = "llama2-chat.conversations.v1"  # chat.js
ARTIFACTS = Path(os.environ.get("LLAMA2_TEST_ARTIFACTS", REPO / "test-artifacts"))
WAIT_S = 20  # the longest any one wait in the browser may take


server = serve_fixture("--api-key", KEY)
http = http_fixture(KEY)


def api_reply(http, body: dict) -> str:
    """What the API answers for the page's request body, unstreamed."""
    r = http.post("/v1/chat/completions", json=dict(body, stream=False))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# -- without a browser ------------------------------------------------------------------------

class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


def test_page_is_served_without_the_key(server, http):
    from llama2.server import page

    with httpx.Client(base_url=server.base, timeout=30) as anon:
        r = anon.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.content == page.read("index.html")  # from the package's static/
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        links = Links()
        links.feed(r.text)
        # everything from this server: nothing to fetch from elsewhere, works offline
        assert links.urls and all(u.startswith("/") or u.startswith("data:") for u in links.urls), links.urls
        for path, kind in (("/static/chat.js", "text/javascript"), ("/static/chat.css", "text/css")):
            r = anon.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            assert r.content == page.read(Path(path).name)
            assert path in links.urls
        assert "innerHTML" not in anon.get("/static/chat.js").text
        assert anon.get("/v1/models").status_code == 401  # the API still needs the key
        assert anon.post("/", json={}).status_code == 405
    assert http.get("/v1/models").status_code == 200


# -- the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does this as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start; the
    # browser only ever loads the local test server.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760", "--lang=en-US"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium: never download a driver or a browser
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.execute_cdp_cmd("Network.enable", {})  # network emulation (slow, offline) needs it
        yield driver
    finally:
        driver.quit()


class Page:
    """The chat page in the browser, with the steps a user takes."""

    def __init__(self, driver, base):
        self.d, self.base = driver, base

    def open(self, key=KEY, seed="42", **settings):
        """A fresh page: nothing stored, the given settings typed into the settings form."""
        self.d.execute_cdp_cmd("Network.emulateNetworkConditions", NETWORK)
        self.d.get(self.base + "/")
        self.d.execute_script("localStorage.clear()")
        self.d.get(self.base + "/")
        self.wait(lambda: self.js("return document.getElementById('model').textContent") == "· " + MODEL,
                  "the model's name")
        self.set(api_key=key, seed=seed, **settings)
        return self

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def find(self, css):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, css)

    def finds(self, css):
        from selenium.webdriver.common.by import By
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, what, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page text:\n{self.find('body').text}")
            time.sleep(0.02)

    def set(self, **settings):
        if self.find("#settings").get_attribute("hidden") is not None:
            self.find("#settings-toggle").click()
        for name, value in settings.items():
            field = self.find("#" + name)
            if field.get_attribute("type") == "checkbox":
                if field.is_selected() != bool(value):
                    field.click()
            else:
                field.clear()
                field.send_keys(str(value))
        self.find("#input").click()  # leaves the last field: its change event fires

    def send(self, text, wait=True):
        box = self.find("#input")
        box.send_keys(text)
        box.send_keys("\n")  # Enter sends
        if wait:
            self.idle()

    def busy(self) -> bool:
        return self.js("return document.body.dataset.busy") == "true"

    def idle(self):
        self.wait(lambda: not self.busy(), "the reply to finish")

    def messages(self) -> list:
        """(role, rendered text, error text) of each message shown."""
        return [tuple(x) for x in self.js("""return [...document.querySelectorAll('#messages .msg')].map(m =>
            [m.dataset.role, m.querySelector('.body').innerText,
             (m.querySelector('.error') || {}).textContent || ''])""")]

    def stored(self) -> dict:
        return json.loads(self.js(f"return localStorage.getItem('{STORE_KEY}')"))

    def stored_current(self) -> list:
        store = self.stored()
        conv = next(c for c in store["conversations"] if c["id"] == store["current"])
        return conv["messages"]

    def request_body(self, messages, **fields) -> dict:
        """The body the page sends for `messages` with this test's settings."""
        return {"model": MODEL, "messages": [{"role": r, "content": c} for r, c in messages], "seed": 42,
                **fields}

    def record_requests(self):
        """Keep a copy of each chat request body the page sends (then let it through)."""
        self.js("""window.__requests = []; const real = window.fetch;
            window.fetch = (url, init) => { if (String(url).endsWith('/v1/chat/completions'))
                window.__requests.push(JSON.parse(init.body)); return real(url, init); };""")

    def requests(self) -> list:
        return self.js("return window.__requests")

    def canned_stream(self, pieces):
        """The next chat requests get this event stream (pieces of SSE text, 10 ms apart)."""
        self.js("""const pieces = arguments[0]; window.__requests = [];
            window.fetch = async (url, init) => {
                window.__requests.push(JSON.parse(init.body));
                const encoder = new TextEncoder();
                const body = new ReadableStream({async start(c) {
                    for (const p of pieces) { c.enqueue(encoder.encode(p)); await new Promise(r => setTimeout(r, 10)); }
                    c.close(); }});
                return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
            };""", pieces)

    def screenshot(self, name):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        assert self.d.save_screenshot(str(path)), path
        return path


NETWORK = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}


@pytest.fixture
def page(browser, server):
    return Page(browser, server.base)


def sse(*objects) -> list:
    return ["data: " + (o if isinstance(o, str) else json.dumps(o)) + "\n\n" for o in objects]


def chunk(content=None, finish=None):
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def plain(text: str) -> str:
    """Text without whitespace and markdown punctuation: a rendering's text compares to its source."""
    return re.sub(r"[\s*_#>`~-]", "", text)


@pytest.mark.browser
def test_reply_streams_in_and_equals_the_api(page, http):
    page.open(system="You are a storyteller.", max_tokens="120")
    # every change to the reply's text, as the browser renders it
    page.js("""window.__lengths = []; new MutationObserver(() => {
            const b = document.querySelector('#messages .msg.assistant .body');
            if (b) window.__lengths.push(b.textContent.length); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    # stories260K answers in a fraction of a second: a link of 20 kB/s (about 100 events a second)
    # lets the browser see the stream arrive piece by piece, as a remote user would
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", dict(NETWORK, downloadThroughput=20_000))
    page.send("Tell me a story about a cat.")
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", NETWORK)
    lengths = page.js("return window.__lengths")
    growth = [n for a, n in zip([0] + lengths, lengths) if n > a]
    assert len(growth) >= 5, lengths  # it grew in many steps: streamed, not put there at once
    assert lengths == sorted(lengths), lengths

    body = page.request_body([("system", "You are a storyteller."), ("user", "Tell me a story about a cat.")],
                             max_tokens=120)
    expected = api_reply(http, body)
    stored = page.stored_current()
    assert [(m["role"], m["content"]) for m in stored] == [("user", "Tell me a story about a cat."),
                                                           ("assistant", expected)]
    assert stored[1].get("finish") in ("stop", "length")
    (_, user, _), (role, shown, error) = page.messages()
    assert user == "Tell me a story about a cat." and role == "assistant" and error == ""
    assert plain(shown) == plain(expected)
    page.find("#settings-toggle").click()
    assert not page.find("#settings").is_displayed()
    path = page.screenshot("chat-page.png")
    assert path.stat().st_size > 10_000


@pytest.mark.browser
def test_stop_then_regenerate(page, http):
    page.open(max_tokens="200")
    full = api_reply(http, page.request_body([("user", "Once upon a time")], max_tokens=200))
    # a slow network (about 20 events a second), so that there is time to press Stop mid-reply
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", dict(NETWORK, downloadThroughput=3000))
    page.send("Once upon a time", wait=False)
    page.wait(lambda: len(page.js("return (document.querySelector('.msg.assistant .body') || {}).textContent"
                                  " || ''")) > 5, "the first words of the reply")
    assert page.busy() and page.find("#stop").is_displayed() and not page.find("#send").is_displayed()
    page.find("#stop").click()
    page.idle()
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", NETWORK)
    stopped = page.stored_current()[1]
    assert stopped["stopped"] is True and "error" not in stopped
    assert 0 < len(stopped["content"]) < len(full) and full.startswith(stopped["content"])
    assert page.find(".msg.assistant .meta .stopped").text == "stopped"
    time.sleep(0.3)
    assert page.stored_current()[1]["content"] == stopped["content"]  # nothing more came in

    page.set(seed="7")
    page.find(".msg.assistant .actions .regenerate").click()
    page.idle()
    expected = api_reply(http, dict(page.request_body([("user", "Once upon a time")], max_tokens=200), seed=7))
    assert [(m["role"], m["content"]) for m in page.stored_current()] == [("user", "Once upon a time"),
                                                                         ("assistant", expected)]
    assert "stopped" not in page.stored_current()[1]
    assert len(page.messages()) == 2


@pytest.mark.browser
def test_edit_a_past_message_reload_and_delete(page, http):
    page.open(max_tokens="40")
    page.send("Lily had a ball.")
    page.send("What did Tom do?")
    assert [m[0] for m in page.messages()] == ["user", "assistant", "user", "assistant"]
    first = page.stored_current()[1]["content"]
    assert first == api_reply(http, page.request_body([("user", "Lily had a ball.")], max_tokens=40))
    second = page.stored_current()[3]["content"]  # the whole conversation went with the second message
    assert second == api_reply(http, page.request_body(
        [("user", "Lily had a ball."), ("assistant", first), ("user", "What did Tom do?")], max_tokens=40))

    page.finds(".msg.user .actions .edit")[0].click()
    box = page.find(".msg.user .edit-box")
    box.clear()
    box.send_keys("Tom found a dog.")
    page.find(".msg.user .actions .save-send").click()
    page.idle()
    edited = page.stored_current()
    assert [(m["role"], m["content"]) for m in edited] == [
        ("user", "Tom found a dog."),
        ("assistant", api_reply(http, page.request_body([("user", "Tom found a dog.")], max_tokens=40)))]

    page.find("#new-chat").click()
    assert page.messages() == []
    page.send("The sun was hot.")
    titles = [b.text for b in page.finds("#conversations .open")]
    assert titles == ["The sun was hot.", "Tom found a dog."]

    page.d.refresh()
    page.wait(lambda: len(page.finds("#conversations .open")) == 2, "the saved conversations")
    assert [b.text for b in page.finds("#conversations .open")] == titles
    assert page.messages()[0][1] == "The sun was hot."  # the current one is back
    page.finds("#conversations .open")[1].click()
    assert [(role, text) for role, text, _ in page.messages()][0] == ("user", "Tom found a dog.")
    assert page.stored_current() == edited

    delete = page.finds("#conversations .delete")[0]
    delete.click()
    assert len(page.finds("#conversations li")) == 2  # the first click only asks
    delete.click()
    assert [b.text for b in page.finds("#conversations .open")] == ["Tom found a dog."]
    page.d.refresh()
    page.wait(lambda: page.finds("#conversations .open"), "the saved conversation")
    assert [b.text for b in page.finds("#conversations .open")] == ["Tom found a dog."]

    # storage that does not read back is kept aside and said so, and the page starts afresh
    page.js(f"localStorage.setItem('{STORE_KEY}', '{{\"version\": 1, \"conversations\": 5}}')")
    page.d.refresh()
    page.wait(lambda: "could not be read" in page.find("#notice").text, "the notice about storage")
    assert page.finds("#conversations li") == [] and page.messages() == []
    assert json.loads(page.js(f"return localStorage.getItem('{STORE_KEY}.unreadable')")) == {
        "version": 1, "conversations": 5}
    page.send("Hello again")
    assert [m[0] for m in page.messages()] == ["user", "assistant"] and page.messages()[1][2] == ""


@pytest.mark.browser
def test_errors_are_shown(page, http):
    # a wrong API key: the page says the server wants one, and the request's 401 is shown
    page.open(key="wrong")
    page.wait(lambda: "not accepted" in page.find("#notice").text, "the notice about the key")
    page.send("Hello")
    (_, _, _), (_, _, error) = page.messages()
    assert error.startswith("HTTP 401: Incorrect or missing API key") and "Settings" in error, error

    # the right key and a regenerate: the same message is answered
    page.set(api_key=KEY)
    page.wait(lambda: page.find("#notice").get_attribute("hidden") is not None, "the notice to go")
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    assert page.messages()[1][2] == "" and page.stored_current()[1]["content"]

    # a setting the server refuses: its 400 and the field named
    page.set(max_tokens="0")
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    r = http.post("/v1/chat/completions", json=page.request_body([("user", "Hello")], max_tokens=0))
    assert r.status_code == 400
    assert page.messages()[1][2] == "HTTP 400: " + r.json()["error"]["message"]
    assert "max_tokens" in page.messages()[1][2]

    # JSON mode: the page asks for a JSON object and shows whatever the server answers
    page.set(max_tokens="30", json=True)
    page.record_requests()
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    (sent,) = page.requests()
    assert sent["response_format"] == {"type": "json_object"} and sent["stream"] is True
    r = http.post("/v1/chat/completions", json=dict(sent, stream=False))
    if r.status_code == 200:
        assert page.stored_current()[1]["content"] == r.json()["choices"][0]["message"]["content"]
    else:  # a server without structured output refuses response_format
        assert page.messages()[1][2] == f"HTTP {r.status_code}: " + r.json()["error"]["message"]
    page.set(json=False)

    # the network fails
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", dict(NETWORK, offline=True))
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    page.d.execute_cdp_cmd("Network.emulateNetworkConditions", NETWORK)
    assert page.messages()[1][2].startswith("Network error:"), page.messages()

    # an error event in the middle of a stream: the text so far stays, the error is shown
    page.canned_stream(sse(chunk(""), chunk("Once upon"), chunk(" a time"),
                           {"error": {"message": "generation failed: out of memory", "type": "server_error",
                                      "param": None, "code": "server_error"}}, "[DONE]"))
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    (_, _, _), (_, shown, error) = page.messages()
    assert shown == "Once upon a time" and error == "Server error: generation failed: out of memory"

    # a stream that ends without [DONE]
    page.canned_stream(sse(chunk(""), chunk("Once")))
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    assert page.messages()[1][2] == "The answer was cut off: the connection closed before its end."
    page.screenshot("chat-page-errors.png")


INJECTION = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
MARKDOWN = ("Some **bold**, *em*, _also em_ and `a <b>code</b> span`.\n"
            "Second line.\n\n"
            "- one\n- two with `x`\n  - nested\n\n"
            "1. first\n2. second\n\n"
            "```python\nprint('<b>hi</b>')\n```\n\n"
            "> quoted " + INJECTION + "\n\n"
            "[a link](javascript:alert(1)) " + INJECTION)


@pytest.mark.browser
def test_markdown_is_rendered_and_html_stays_text(page, http):
    page.open(max_tokens="20")
    page.send("Look: " + INJECTION)  # a user message, through the real server
    assert page.messages()[0][1] == "Look: " + INJECTION
    # model output full of markdown and HTML, split anywhere (inside the fence, inside a tag)
    pieces = [MARKDOWN[i:i + 7] for i in range(0, len(MARKDOWN), 7)]
    page.canned_stream(sse(chunk(""), *[chunk(p) for p in pieces], chunk(finish="stop"), "[DONE]"))
    page.find(".msg.assistant .regenerate").click()
    page.idle()
    assert page.stored_current()[1]["content"] == MARKDOWN

    def check():
        assert page.js("return window.__pwned") is None
        # no element from the text: only the markdown renderer's own
        tags = set(page.js("return [...document.querySelectorAll('#messages .body *')]"
                           ".map(e => e.tagName.toLowerCase())"))
        assert tags <= {"p", "br", "strong", "em", "code", "ul", "ol", "li", "pre", "blockquote", "a", "del", "h1",
                        "h2", "h3", "h4", "h5", "h6", "hr"}, tags
        assert not page.finds("#messages img") and not page.finds("#messages script")
        reply = ".msg.assistant .body"
        assert [e.text for e in page.finds(reply + " > p strong")] == ["bold"]
        assert [e.text for e in page.finds(reply + " > p em")] == ["em", "also em"]
        assert [e.text for e in page.finds(reply + " > p code")] == ["a <b>code</b> span"]
        assert [e.get_attribute("textContent") for e in page.finds(reply + " > ul > li")] == [
            "one", "two with xnested"]
        assert page.find(reply + " > ul > li ul > li").text == "nested"
        assert [e.text for e in page.finds(reply + " > ol > li")] == ["first", "second"]
        code = page.find(reply + " > pre > code")
        assert code.text == "print('<b>hi</b>')" and code.get_attribute("class") == "language-python"
        assert page.find(reply + " > blockquote").text == "quoted " + INJECTION
        assert not page.finds(reply + " a")  # only http(s) links become links
        assert page.finds(reply + " > p")[-1].text == "[a link](javascript:alert(1)) " + INJECTION

    check()
    page.d.refresh()  # stored, then rendered again from storage
    page.wait(lambda: page.finds(".msg.assistant .body pre"), "the stored conversation")
    check()
