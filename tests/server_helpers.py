"""Start `llama2 serve` as a subprocess on a free loopback port, for the server tests, and the
module-scoped fixtures those tests share (a server with given flags, its openai and httpx clients)."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, asset

START_TIMEOUT_S = 120  # the first server may compile the engine's kernels
JSON = {"Content-Type": "application/json"}  # for tests that post raw bytes as a JSON body
READY = re.compile(r"at (http://127\.0\.0\.1:(\d+)/v1)")


class Server:
    """A running server: `url` is its /v1 base URL, `base` the root; `stderr` what it printed."""

    def __init__(self, *flags, model="stories260K.bin", tokenizer="tok512.bin"):
        env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, "-m", "llama2", "serve", str(asset(model)), "-z", str(asset(tokenizer)),
                "--port", "0", *flags]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.url is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + self.stderr)
        self.base = self.url[:-len("/v1")]

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # it exited

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def wait_idle(self, client, timeout=30.0) -> dict:
        """Poll /health until nothing is active or waiting (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            health = client.get(self.base + "/health").json()
            if health["active"] == 0 and health["waiting"] == 0:
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout} s: {health}")
            time.sleep(0.02)


def metric(text: str, name: str) -> float:
    """The value of one sample line `name value` (labels included in `name`) of a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def serve_fixture(*flags):
    """A module-scoped `server` fixture: `llama2 serve` with `flags`, which must exit 0 on SIGTERM
    after the module's tests (`server = serve_fixture("--max-batch", "4")` in the test module)."""

    @pytest.fixture(scope="module")
    def server():
        s = Server(*flags)
        yield s
        assert s.terminate() == 0, s.stderr

    return server


def openai_fixture():
    """A module-scoped `client` fixture: the official openai client of the module's `server`."""

    @pytest.fixture(scope="module")
    def client(server):
        import openai
        return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)

    return client


def app_client_fixture(model_name, **settings):
    """A module-scoped `client` fixture: starlette's in-process TestClient of create_app over the
    module's `llama` with ServerConfig(model_name, **settings); after the module's tests no request
    may still be active."""

    @pytest.fixture(scope="module")
    def client(llama):
        from starlette.testclient import TestClient

        from llama2.server.app import create_app
        from llama2.server.config import ServerConfig

        app = create_app(llama, ServerConfig(model_name=model_name, **settings))
        with TestClient(app, base_url="http://127.0.0.1") as c:  # a loopback Host (security.py)
            yield c
            health = c.get("/health")
            assert health.status_code == 200 and health.json()["active"] == 0

    return client


def http_fixture(key):
    """A module-scoped `http` fixture: an httpx client of the module's `server`, sending `key`."""

    @pytest.fixture(scope="module")
    def http(server):
        import httpx
        with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            yield c

    return http


@contextlib.contextmanager
def chromium(*switches):
    """A headless Chromium (Debian's chromium, driven by Debian's chromium-driver through selenium,
    never downloading either) with more command-line `switches`; the test skips, saying why, when
    they are not installed (`.ci/run` installs them)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does this as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start; the
    # browser only ever loads local test servers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", *switches):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # selenium: never download a driver or a browser
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


class RecordingModel:
    """The real model, recording each pass: its segments as (slot, rows) in `passes`, its rows'
    adapters in `adapters`."""

    def __init__(self, model):
        self.model, self.passes, self.adapters = model, [], []
        self.config, self.invariant_rows = model.config, model.invariant_rows

    def new_cache(self, *args, **kw):
        return self.model.new_cache(*args, **kw)

    def warm_up(self):
        self.model.warm_up()

    def matrices(self):
        return self.model.matrices()

    def forward_batch(self, segments, cache, all_logits=False, adapters=None):
        self.passes.append([(slot, len(tokens)) for slot, tokens in segments])
        self.adapters.append(adapters)
        return self.model.forward_batch(segments, cache, all_logits, adapters)
