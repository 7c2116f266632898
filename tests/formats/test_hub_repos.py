"""`hf:ORG/REPO[:QUANT|/FILE]` and `Llama.from_pretrained` through huggingface_hub, against a loopback
server shaped like the Hugging Face hub at HF_ENDPOINT: the endpoints huggingface_hub calls
(GET /api/models/{repo}[/revision/{rev}] for the file list; HEAD and GET, with byte ranges,
/{repo}/resolve/{rev}/{file}). A quant tag picks the GGUF file, a repo without GGUF gives its
safetensors folder, a cut connection resumes, HF_TOKEN is sent, and offline is one line."""

import hashlib
import http.server
import io
import json
import re
import shutil
import socket
import threading
import urllib.parse

import numpy as np
import pytest

from conftest import asset
from llama2 import Llama, hub
from llama2.cli import main
from llama2.errors import Llama2Error, UsageError

hh_constants = pytest.importorskip("huggingface_hub.constants", reason="hub downloads go through huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves `repos` ({repo: {path: bytes}}). A file in `cut` has its first GET cut off halfway
    through the body (the connection closed); `log` records (method, path, Range, Authorization)."""

    def __init__(self, repos):
        self.repos, self.cut, self.log = repos, set(), []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                owner.log.append((self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if api:
                    files = owner.repos.get(api.group(1))
                    if files is None:
                        return self._send(404, b'{"error": "Repository not found"}',
                                          [("X-Error-Code", "RepoNotFound"), ("Content-Type", "application/json")])
                    body = json.dumps({"id": api.group(1), "sha": COMMIT,
                                       "siblings": [{"rfilename": f} for f in files]}).encode()
                    return self._send(200, body, [("Content-Type", "application/json")])
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
                data = m and owner.repos.get(m.group(1), {}).get(m.group(2))
                if data is None:
                    return self._send(404, b"", [("X-Error-Code", "EntryNotFound")])
                headers = [("X-Repo-Commit", COMMIT), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"'),
                           ("Accept-Ranges", "bytes")]
                if self.command == "HEAD":
                    self.send_response(200)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                start = 0
                rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if rng:
                    start = int(rng.group(1))
                    headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
                key = (m.group(1), m.group(2))
                if key in owner.cut and not rng:
                    owner.cut.discard(key)
                    self.send_response(200)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_response(206 if rng else 200)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            do_GET = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self, suffix):
        return [entry for entry in self.log if entry[0] == "GET" and entry[1].endswith(suffix)]


GGUF_REPO = "test/rand256-GGUF"


def gguf_repo():
    files = {f"rand256-{q}.gguf": asset(f"kquant/rand256-{q}.gguf").read_bytes() for q in ("f16", "q8_0", "q4_k_m")}
    return {**files, "README.md": b"# rand256\n"}


def safetensors_repo(tmp_path):
    """A tiny transformers-made Llama with tok512's sentencepiece model, and files a folder does not
    need (never downloaded)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    src = tmp_path / "tiny-hf-src"
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    shutil.copy(asset("tok512.model"), src / "tokenizer.model")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    return src, {**files, "model.onnx": b"not needed", "original/params.json": b"{}"}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    h = FakeHub({GGUF_REPO: gguf_repo()})
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hh_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # not the user's cache
    monkeypatch.setattr(hh_constants, "HF_HUB_OFFLINE", False)
    yield h
    h.httpd.shutdown()


def test_parse_hf():
    assert hub.parse_hf("hf:org/repo") == ("org/repo", None, None)
    assert hub.parse_hf("hf:org/repo:Q4_K_M") == ("org/repo", None, "Q4_K_M")
    assert hub.parse_hf("hf:org/repo/sub/model.gguf") == ("org/repo", "sub/model.gguf", None)
    for bad in ("hf:org", "hf:org/", "hf:org/repo/f.gguf:Q8_0", "hf:org/repo:a:b"):
        with pytest.raises(UsageError, match="expected hf:ORG/REPO"):
            hub.parse_hf(bad)
    out, err = io.BytesIO(), io.StringIO()
    assert main(["run", "hf:org"], stdout=out, stderr=err, stdin=io.StringIO("")) == 2


def test_quant_tag_picks_the_gguf_and_the_default_is_q4_k_m(fake_hub):
    for spec, name in [(f"hf:{GGUF_REPO}:Q8_0", "rand256-q8_0.gguf"), (f"hf:{GGUF_REPO}:f16", "rand256-f16.gguf"),
                       (f"hf:{GGUF_REPO}", "rand256-q4_k_m.gguf"),
                       (f"hf:{GGUF_REPO}/rand256-f16.gguf", "rand256-f16.gguf")]:
        path = hub.resolve(spec)
        assert path.name == name and path.read_bytes() == fake_hub.repos[GGUF_REPO][name]
    assert not fake_hub.gets("README.md")  # only the model file is fetched
    assert Llama.from_pretrained(GGUF_REPO, quant="Q8_0").checkpoint.dtype == "q8_0"
    assert Llama.from_pretrained(GGUF_REPO, filename="*f16.gguf").checkpoint.dtype == "fp16"
    with pytest.raises(Llama2Error, match=r"^hf:test/rand256-GGUF: no GGUF file of type Q5_0 \(its GGUF files: "
                                          r"rand256-f16.gguf, rand256-q4_k_m.gguf, rand256-q8_0.gguf\)"):
        hub.resolve(f"hf:{GGUF_REPO}:Q5_0")


def test_cli_runs_a_model_from_the_hub(fake_hub):
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", f"hf:{GGUF_REPO}:Q8_0", "Once", "-n", "8", "-t", "0"], stdout=out, stderr=err,
                stdin=io.StringIO(""))
    assert code == 0, err.getvalue()
    local = Llama.load(asset("kquant/rand256-q8_0.gguf"))
    assert out.getvalue() == b"".join(e.raw for e in local.stream("Once", steps=8, temperature=0)) + b"\n"


def test_download_resumes_after_a_cut_connection(fake_hub, monkeypatch):
    # huggingface_hub keeps what it received in whole chunks (10 MB); smaller ones for a small file
    chunk = 1 << 16
    monkeypatch.setattr(hh_constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    data = fake_hub.repos[GGUF_REPO]["rand256-q8_0.gguf"]
    fake_hub.cut.add((GGUF_REPO, "rand256-q8_0.gguf"))
    path = hub.resolve(f"hf:{GGUF_REPO}:Q8_0")
    assert path.read_bytes() == data
    gets = fake_hub.gets("rand256-q8_0.gguf")
    kept = len(data) // 2 // chunk * chunk
    assert [g[2] for g in gets] == [None, f"bytes={kept}-"]  # the rest, not the whole file again


def test_repo_without_gguf_downloads_the_safetensors_folder(fake_hub, tmp_path):
    src, files = safetensors_repo(tmp_path)
    fake_hub.repos["test/tiny-hf"] = files
    folder = hub.resolve("hf:test/tiny-hf")
    assert folder.is_dir() and (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file()
    assert not fake_hub.gets("model.onnx") and not fake_hub.gets("params.json")
    ids = [1, 5, 99, 300, 7]
    np.testing.assert_array_equal(Llama.from_pretrained("test/tiny-hf").logits(ids), Llama.load(src).logits(ids))


def test_hf_token_is_sent(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.resolve(f"hf:{GGUF_REPO}:Q8_0")
    assert fake_hub.log and all(auth == "Bearer hf_secret" for *_, auth in fake_hub.log)


def test_offline_uses_the_cache_or_says_what_to_do_in_one_line(fake_hub, monkeypatch):
    first = hub.resolve(f"hf:{GGUF_REPO}:Q8_0")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    assert hub.resolve(f"hf:{GGUF_REPO}:Q8_0") == first  # from the cache
    with pytest.raises(Llama2Error) as e:
        hub.resolve("hf:test/elsewhere:Q8_0")
    msg = str(e.value)
    assert msg.startswith("hf:test/elsewhere: cannot reach the Hugging Face hub") and "\n" not in msg
    assert "hf download test/elsewhere" in msg
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", "hf:test/elsewhere"], stdout=out, stderr=err, stdin=io.StringIO(""))
    assert code == 1 and err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue()


def test_unknown_repo_is_one_line(fake_hub):
    with pytest.raises(Llama2Error, match=r"^hf:test/missing: no such repo on the hub \(or it is private: "
                                          r"set HF_TOKEN\)$"):
        hub.resolve("hf:test/missing")
