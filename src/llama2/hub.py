"""Where models and tokenizers come from: a path as given, else the cache folder, else a download.

The cache folder is `$LLAMA2_HOME` or `~/.cache/llama2`. Known files (karpathy's tinyllamas on the
Hugging Face hub, llama2.c's tokenizer.bin) are fetched on first use with a progress bar; offline,
the error says what to download and where to put it.
"""

import os
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


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA2_HOME") or Path.home() / ".cache" / "llama2")


def _source(name) -> str:
    src = KNOWN_FILES[name]
    return src if isinstance(src, str) else f"https://huggingface.co/{src[0]}/resolve/main/{src[1]}"


def resolve(name, what="model", download=True) -> Path:
    """Find `name` as given, then in the cache folder; download it there if it is a known file."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.name != str(name):  # a path with folders is taken as given, never looked up elsewhere
        raise Llama2Error(f"{name}: no such {what} file")
    if (cache_dir() / path.name).exists():
        return cache_dir() / path.name
    if name in KNOWN_FILES and download:
        return fetch(name)
    raise Llama2Error(f"{name}: no such {what} file (or put it in {cache_dir()})")


def fetch(name) -> Path:
    """Download a known file into the cache folder (atomically), with a progress bar on stderr."""
    dest = cache_dir() / name
    url = _source(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _download(url, part)
        os.replace(part, dest)
    except Exception as e:  # any network failure: say what to fetch and where to put it
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise Llama2Error(f"cannot download {name} ({reason}): download {url} and put it at {dest}") from None
    return dest


def _download(url, dest: Path):
    """One plain HTTPS GET (the hub's resolve URLs redirect to its CDN): it fails at once when the
    network is unreachable, instead of retrying with backoff."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("LLAMA2_OFFLINE"):
        raise ConnectionError("offline mode is set")
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=30) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name[: -len(".part")],
                  file=sys.stderr) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
