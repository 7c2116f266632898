"""Where models and tokenizers come from: a path as given, else the cache folder, else a download.

The cache folder is `$LLAMA2_HOME` or `~/.cache/llama2`. Known files (karpathy's tinyllamas on the
Hugging Face hub, llama2.c's tokenizer.bin) are fetched on first use with a progress bar; offline,
the error says what to download and where to put it.

Every download is checked by SHA-256 before it is moved into place: against the digest pinned here
for the files the project knows (the published files, as in its test assets), else against the
digest the Hugging Face hub announces for an LFS file (its `X-Linked-Etag` header, on the resolve
URL's redirect, or `ETag` when it is a SHA-256). A mismatch, or a file with no digest to check,
deletes the partial download and says so in one line.
"""

import hashlib
import os
import re
import sys
import urllib.request
from pathlib import Path

from .errors import Llama2Error

# file name -> (Hugging Face repo, file in the repo) or a direct URL
KNOWN_FILES = {
    "stories15M.bin": ("karpathy/tinyllamas", "stories15M.bin"),
    "stories42M.bin": ("karpathy/tinyllamas", "stories42M.bin"),
    "stories110M.bin": ("karpathy/tinyllamas", "stories110M.bin"),
    "stories260K.bin": ("karpathy/tinyllamas", "stories260K/stories260K.bin"),
    "tok512.bin": ("karpathy/tinyllamas", "stories260K/tok512.bin"),
    "tokenizer.bin": "https://github.com/karpathy/llama2.c/raw/master/tokenizer.bin",
}

# file name -> SHA-256 of the published file (the copies in the project's shared test assets)
PINNED_SHA256 = {
    "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
    "tokenizer.bin": "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361",
}

_SHA256 = re.compile(r'^(?:w/)?"?([0-9a-f]{64})"?$')


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA2_HOME") or Path.home() / ".cache" / "llama2")


def _source(name) -> str:
    src = KNOWN_FILES[name]
    return src if isinstance(src, str) else f"https://huggingface.co/{src[0]}/resolve/main/{src[1]}"


def resolve(name, what="model", download=True) -> Path:
    """Find `name` as given, then in the cache folder; download it there if it is a known file."""
    path = Path(name).expanduser()
    if os.path.lexists(path):  # whatever is there (a symlink loop, a FIFO): its reader says what is wrong
        return path
    if path.name != str(name):  # a path with folders is taken as given, never looked up elsewhere
        raise Llama2Error(f"{name}: no such {what} file")
    if (cache_dir() / path.name).exists():
        return cache_dir() / path.name
    if name in KNOWN_FILES and download:
        return fetch(name)
    raise Llama2Error(f"{name}: no such {what} file (or put it in {cache_dir()})")


def fetch(name) -> Path:
    """Download a known file into the cache folder (atomically, after its SHA-256 is checked), with
    a progress bar on stderr."""
    dest = cache_dir() / name
    url = _source(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        got, announced = _download(url, part)
    except Exception as e:  # any network failure: say what to fetch and where to put it
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise Llama2Error(f"cannot download {name} ({reason}): download {url} and put it at {dest}") from None
    want, source = (PINNED_SHA256[name], "pinned") if name in PINNED_SHA256 else (announced, "announced by the server")
    if want is None or got != want:
        part.unlink(missing_ok=True)
        problem = ("no SHA-256 to check it against (the server announced none)" if want is None else
                   f"SHA-256 {got} but {want} was expected ({source})")
        raise Llama2Error(f"downloaded {name} from {url} has {problem}; the download was deleted "
                          f"(fetch it again, or put a verified copy at {dest})")
    os.replace(part, dest)
    return dest


def announced_sha256(headers) -> str:
    """The SHA-256 a hub response announces: X-Linked-Etag (LFS files), or an ETag that is one."""
    for key in ("X-Linked-Etag", "ETag"):
        m = _SHA256.match((headers.get(key) or "").strip().lower())
        if m:
            return m.group(1)
    return None


class _Announced(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the digest announced on the way (the hub's resolve URL answers
    with a redirect to its CDN that carries X-Linked-Etag)."""

    def __init__(self):
        self.digest = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.digest = self.digest or announced_sha256(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url, dest: Path) -> tuple:
    """One plain HTTPS GET (the hub's resolve URLs redirect to its CDN): it fails at once when the
    network is unreachable, instead of retrying with backoff. Returns (SHA-256 of what was written,
    the SHA-256 the server announced or None)."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("LLAMA2_OFFLINE"):
        raise ConnectionError("offline mode is set")
    from tqdm import tqdm

    redirects = _Announced()
    digest = hashlib.sha256()
    with urllib.request.build_opener(redirects).open(url, timeout=30) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name[: -len(".part")],
                  file=sys.stderr) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        return digest.hexdigest(), redirects.digest or announced_sha256(r.headers)
