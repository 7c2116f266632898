"""Verified downloads: a known file fetched over loopback HTTP is checked by SHA-256 (pinned, or the
digest the hub announces for LFS files in X-Linked-Etag on its redirect) and a mismatch leaves
nothing behind."""

import hashlib
import http.server
import threading

import pytest

from conftest import asset
from llama2 import hub
from llama2.errors import Llama2Error


class Hub:
    """A loopback server shaped like the Hugging Face hub: /resolve/NAME redirects to /cdn/NAME,
    announcing `linked` (a SHA-256) in X-Linked-Etag; /cdn/NAME serves `files[NAME]`."""

    def __init__(self):
        self.files, self.linked = {}, {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                kind, _, name = self.path.lstrip("/").partition("/")
                if kind == "resolve":
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{name}")
                    if name in owner.linked:
                        self.send_header("X-Linked-Etag", f'"{owner.linked[name]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = owner.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"not-a-digest"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_port}/resolve/{name}"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    h = Hub()
    monkeypatch.setenv("LLAMA2_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMA2_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    yield h
    h.httpd.shutdown()


def left_behind(tmp_path):
    home = tmp_path / "home"
    return sorted(p.name for p in home.iterdir()) if home.exists() else []


def test_pinned_digests_are_the_published_files():
    for name, digest in hub.PINNED_SHA256.items():
        assert name in hub.KNOWN_FILES
        assert hashlib.sha256(asset(name).read_bytes()).hexdigest() == digest


def test_wrong_bytes_for_a_pinned_file_are_rejected_and_deleted(fake_hub, tmp_path, monkeypatch):
    good = asset("tok512.bin").read_bytes()
    fake_hub.files["tok512.bin"] = good[:-1] + bytes([good[-1] ^ 1])  # one bit off
    fake_hub.linked["tok512.bin"] = hashlib.sha256(fake_hub.files["tok512.bin"]).hexdigest()  # a lie
    monkeypatch.setitem(hub.KNOWN_FILES, "tok512.bin", fake_hub.url("tok512.bin"))
    with pytest.raises(Llama2Error) as e:
        hub.resolve("tok512.bin", what="tokenizer")
    message = str(e.value)
    assert "\n" not in message and hub.PINNED_SHA256["tok512.bin"] in message and "pinned" in message
    assert "deleted" in message
    assert left_behind(tmp_path) == []


def test_pinned_file_served_right_is_accepted(fake_hub, tmp_path, monkeypatch):
    fake_hub.files["tok512.bin"] = asset("tok512.bin").read_bytes()
    monkeypatch.setitem(hub.KNOWN_FILES, "tok512.bin", fake_hub.url("tok512.bin"))
    path = hub.resolve("tok512.bin", what="tokenizer")
    assert path.read_bytes() == fake_hub.files["tok512.bin"] and left_behind(tmp_path) == ["tok512.bin"]


def test_unpinned_file_is_checked_against_the_linked_etag(fake_hub, tmp_path, monkeypatch):
    data = b"weights" * 1000
    fake_hub.files["model.bin"] = data
    monkeypatch.setitem(hub.KNOWN_FILES, "model.bin", fake_hub.url("model.bin"))
    fake_hub.linked["model.bin"] = hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(Llama2Error) as e:
        hub.resolve("model.bin")
    assert "announced by the server" in str(e.value) and left_behind(tmp_path) == []
    fake_hub.linked["model.bin"] = hashlib.sha256(data).hexdigest()
    assert hub.resolve("model.bin").read_bytes() == data


def test_unpinned_file_without_a_digest_is_refused(fake_hub, tmp_path, monkeypatch):
    fake_hub.files["model.bin"] = b"anything"
    monkeypatch.setitem(hub.KNOWN_FILES, "model.bin", fake_hub.url("model.bin"))
    with pytest.raises(Llama2Error) as e:
        hub.resolve("model.bin")
    assert "no SHA-256" in str(e.value) and left_behind(tmp_path) == []


@pytest.mark.parametrize("header,digest", [
    ('"%s"' % ("ab" * 32), "ab" * 32),
    ('W/"%s"' % ("CD" * 32), "cd" * 32),
    ('"0123456789abcdef0123456789abcdef01234567"', None),  # a git blob id: not a SHA-256
    ("", None),
])
def test_announced_digest(header, digest):
    assert hub.announced_sha256({"X-Linked-Etag": header}) == digest
