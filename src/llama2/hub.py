"""Where models and tokenizers come from: a path as given, else the cache folder, else a download.

The cache folder is `$LLAMA2_HOME` or `~/.cache/llama2`. Known files (karpathy's tinyllamas on the
Hugging Face hub, llama2.c's tokenizer.bin) are fetched on first use with a progress bar; offline,
the error says what to download and where to put it.

Any other model comes from the hub by name, `hf:ORG/REPO[:QUANT|/FILE]` (llama.cpp's -hf), through
`huggingface_hub` (`from_hub`): its shared cache, resumed downloads, HF_TOKEN, HF_ENDPOINT and its
progress bars. A quant tag picks the GGUF file of that type; a repo without GGUF files gives its
safetensors folder (config, weights, tokenizer).

Every download is checked by SHA-256 before it is moved into place: against the digest pinned here
for the files the project knows (the published files, as in its test assets), else against the
digest the Hugging Face hub announces for an LFS file (its `X-Linked-Etag` header, on the resolve
URL's redirect, or `ETag` when it is a SHA-256). A mismatch, or a file with no digest to check,
deletes the partial download and says so in one line.
"""

import fnmatch
import hashlib
import os
import re
import sys
import urllib.request
from pathlib import Path, PurePosixPath

from .errors import Llama2Error, UsageError

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
    """Find `name` as given, then in the cache folder; download it there if it is a known file.
    `hf:ORG/REPO[:QUANT|/FILE]` comes from the Hugging Face hub (`from_hub`)."""
    if str(name).startswith(HF_PREFIX) and download:
        return from_hub(*parse_hf(str(name)))
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


# -- any repo on the Hugging Face hub ---------------------------------------------------------------

HF_PREFIX = "hf:"
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's -hf picks when no tag is given
# A safetensors repo: the files a folder needs (llama2.formats.hf), not the other formats it may hold
FOLDER_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors",
                "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja")


def parse_hf(spec: str) -> tuple:
    """"hf:ORG/REPO", "hf:ORG/REPO:QUANT" or "hf:ORG/REPO/PATH/FILE" -> (repo, filename, quant)."""
    rest = spec[len(HF_PREFIX):]
    rest, _, quant = rest.partition(":")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts) or (quant and len(parts) > 2) or ":" in quant:
        raise UsageError(f"{spec}: expected hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, quant or None


def _quant_of(filename: str, quant: str) -> bool:  # "model.Q4_K_M.gguf" has the tag Q4_K_M
    name = PurePosixPath(filename).name
    return re.search(rf"(^|[-._]){re.escape(quant)}([-._]|$)", name[:-len(".gguf")], re.IGNORECASE) is not None


def pick_files(repo: str, files: list, filename: str = None, quant: str = None) -> tuple:
    """What to download from a repo listing `files`: (files, the one whose path is the model, or
    None for the folder). A `filename` (a glob allowed) names one file; a `quant` tag picks the
    GGUF of that type; else the GGUF of DEFAULT_QUANT or the only one; else the safetensors folder."""
    where = f"{HF_PREFIX}{repo}"
    if filename is not None:
        found = [f for f in files if f == filename or fnmatch.fnmatch(f, filename)]
        if len(found) != 1:
            raise Llama2Error(f"{where}: {'no file matches' if not found else 'several files match'} "
                              f"{filename!r} ({', '.join(found or files) or 'the repo is empty'})")
        return found, found[0]
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if quant is not None:
        found = [f for f in ggufs if _quant_of(f, quant)]
        if len(found) != 1:
            tags = ", ".join(PurePosixPath(f).name for f in ggufs) or "none"
            raise Llama2Error(f"{where}: {'no' if not found else 'more than one'} GGUF file of type {quant} "
                              f"(its GGUF files: {tags}); name one with {where}/FILE")
        return found, found[0]
    if ggufs:
        found = [f for f in ggufs if _quant_of(f, DEFAULT_QUANT)] or (ggufs if len(ggufs) == 1 else [])
        if len(found) != 1:
            raise Llama2Error(f"{where}: has several GGUF files ({', '.join(ggufs)}); pick one with "
                              f"{where}:QUANT (e.g. :Q8_0) or {where}/FILE")
        return found, found[0]
    folder = [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in FOLDER_FILES)]
    if "config.json" not in folder or not any(f.endswith(".safetensors") for f in folder):
        raise Llama2Error(f"{where}: has neither GGUF files nor a safetensors model (config.json and "
                          "*.safetensors)")
    return folder, None


def from_hub(repo: str, filename: str = None, quant: str = None) -> Path:
    """Download a model from the Hugging Face hub into huggingface_hub's cache (resuming a partial
    download) and return its path: the GGUF file (or `filename`), or the safetensors folder. Offline,
    a model already cached is used; else one line says what to do."""
    try:
        import huggingface_hub as hh
        from huggingface_hub import constants, errors
    except ImportError:
        raise Llama2Error(f"{HF_PREFIX}{repo}: downloading from the hub needs huggingface_hub "
                          "(pip install huggingface_hub: a dependency of llama2)") from None
    # read at each call: huggingface_hub reads HF_ENDPOINT once, when it is first imported
    endpoint, token = os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None
    where = f"{HF_PREFIX}{repo}"

    def failure(e) -> Llama2Error:
        if isinstance(e, errors.GatedRepoError):
            return Llama2Error(f"{where}: the repo is gated: accept its license on the hub and set HF_TOKEN")
        if isinstance(e, errors.RepositoryNotFoundError):
            return Llama2Error(f"{where}: no such repo on the hub (or it is private: set HF_TOKEN)")
        if isinstance(e, errors.HfHubHTTPError):
            return Llama2Error(f"{where}: the hub answered {str(e).splitlines()[0]}")
        return Llama2Error(f"{where}: cannot reach the Hugging Face hub ({type(e).__name__}) and it is not "
                           f"in the cache ({constants.HF_HUB_CACHE}); connect to the network (or set "
                           f"HF_ENDPOINT to a mirror), or fetch it where you can with `hf download {repo}`")

    try:
        files = [s.rfilename for s in hh.HfApi(endpoint=endpoint, token=token).model_info(repo).siblings or []]
    except errors.HfHubHTTPError as e:
        raise failure(e) from None
    except Exception as e:  # no connection (httpx's errors, offline mode): the cache may have it
        try:
            snapshot = Path(hh.snapshot_download(repo, local_files_only=True))
        except Exception:
            raise failure(e) from None
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    wanted, model = pick_files(repo, files, filename, quant)
    paths = []
    for f in wanted:
        try:
            paths.append(Path(hh.hf_hub_download(repo, f, endpoint=endpoint, token=token)))
        except Exception as e:
            raise failure(e) from None
    return paths[wanted.index(model)] if model is not None else paths[0].parent
