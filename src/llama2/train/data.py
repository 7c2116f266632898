"""Training data: stories (read by `stories.py`) or the TinyStories hub dataset, tokenized in worker
processes into token shards, and training batches sampled from the shards.

A prepared directory holds `train_NNNN.bin` / `val_NNNN.bin` (raw little-endian uint16 tokens, as
llama2.c's pretokenized shards, or uint32 when the vocabulary needs it) and `meta.json`, written last:
a directory without meta.json, or whose shards disagree with it, is not read as data.
"""

import contextlib
import json
import math
import multiprocessing
import os
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import Llama2Error
from ..fileio import atomic_write
from .stories import progress_bar, read_stories
from .tokenizer import Encoder

META = "meta.json"
META_FORMAT = "llama2-tokens"
SPLITS = ("train", "val")
HUB = "https://huggingface.co"
TINYSTORIES = "roneneldan/TinyStories"
TINYSTORIES_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}


# ---- TinyStories from the Hugging Face hub ------------------------------------------------------

def download_tinystories(cache_dir, hub_url=HUB, progress=None) -> dict:
    """Download TinyStories' train and validation text files (once) -> {split: local path}."""
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    paths = {}
    for split, name in TINYSTORIES_FILES.items():
        path = cache_dir / name
        paths[split] = path
        if path.exists():
            continue
        url = f"{hub_url.rstrip('/')}/datasets/{TINYSTORIES}/resolve/main/{name}"
        try:
            if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("LLAMA2_OFFLINE"):
                raise urllib.error.URLError("offline mode is set")  # as llama2.hub honours them
            with urllib.request.urlopen(url, timeout=30) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with atomic_write(path) as f, tqdm(total=total, desc=name, unit="B", unit_scale=True,
                                                   disable=None if progress is None else not progress,
                                                   dynamic_ncols=True) as bar:
                    while block := response.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise Llama2Error(
                f"cannot download {TINYSTORIES} from {hub_url} ({reason}); offline? fetch "
                f"{TINYSTORIES_FILES['train']} and {TINYSTORIES_FILES['val']} elsewhere and pass them: "
                f"llama2 data prepare {TINYSTORIES_FILES['train']} --val {TINYSTORIES_FILES['val']} "
                "--out DIR --tokenizer TOK") from None
    return paths


# ---- tokenizing into shards ---------------------------------------------------------------------

def token_dtype(vocab_size: int):
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


_worker = {}  # per worker process: the encoder and options, set once by _init_worker


def _init_worker(tokenizer_path, eos, dtype):
    _worker.update(encoder=Encoder(tokenizer_path), eos=eos, dtype=dtype)


def _encode_batch(stories):  # list[str] -> 1-D token array, each story BOS ... [EOS]
    enc, eos = _worker["encoder"], _worker["eos"]
    ids = [i for story in stories for i in enc.encode(story, eos=eos)]
    return np.asarray(ids, dtype=_worker["dtype"])


class _ShardWriter:
    """Cuts one split's token stream into shards of `shard_tokens`; each shard is written whole
    (temp file + rename), so no partial shard ever carries a shard's name."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer, self.buffered, self.shards = [], 0, []

    def add(self, tokens):
        self.buffer.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n):
        data = np.concatenate(self.buffer)
        shard, rest = data[:n], data[n:]
        self.buffer, self.buffered = [rest], rest.size
        name = f"{self.split}_{len(self.shards):04d}.bin"
        with atomic_write(self.out_dir / name) as f:
            f.write(shard.astype(self.dtype, copy=False).tobytes())
        self.shards.append({"file": name, "tokens": int(shard.size)})

    def close(self):
        if self.buffered:
            self._flush(self.buffered)
        return self.shards


def _remove_previous(out_dir):
    """Forget an earlier preparation in out_dir: meta.json first, so an interruption from here on
    leaves a directory that is never read as complete."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / META)
    for split in SPLITS:  # old shards, and temporary files of a prepare that was killed
        for pattern in (f"{split}_[0-9][0-9][0-9][0-9].bin", f".{split}_[0-9][0-9][0-9][0-9].bin.*.part"):
            for old in out_dir.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()


def prepare(inputs, out_dir, tokenizer, *, val_inputs=(), val_fraction=0.01, eos=False, workers=0,
            shard_tokens=50_000_000, separator=None, text_field=None, stories_per_task=512,
            hub_url=HUB, cache_dir=None, progress=None, log=lambda line: None) -> dict:
    """Tokenize stories into token shards in out_dir and write meta.json; returns the metadata.

    `inputs` are files, or "tinystories" to download TinyStories (its own validation file is the
    val split). Files in `val_inputs` form the val split; otherwise every story whose index k has
    floor((k+1)*f) > floor(k*f) goes to val, an exact and evenly spread fraction f of the stories.
    """
    out_dir = Path(out_dir)
    encoder = Encoder(tokenizer)  # fail early on a bad tokenizer, and learn the vocabulary size
    dtype = token_dtype(encoder.vocab_size)
    if not 0.0 <= val_fraction < 1.0:
        raise Llama2Error(f"--val-fraction must be in [0, 1), got {val_fraction}")
    sources = []  # (path, split or None for the fraction rule)
    for item in inputs:
        if str(item).lower() == "tinystories" and not Path(item).exists():
            if cache_dir is None:
                from ..hub import cache_dir as llama2_cache
                cache_dir = llama2_cache() / "datasets" / "TinyStories"
            files = download_tinystories(Path(cache_dir), hub_url, progress)
            sources += [(files["train"], "train"), (files["val"], "val")]
        else:
            sources.append((Path(item), None))
    sources += [(Path(p), "val") for p in val_inputs]
    if not sources:
        raise Llama2Error("no input files given")
    for path, _ in sources:
        if not path.is_file():
            raise Llama2Error(f"{path}: no such file" if not path.exists() else
                              f"{path}: is not a regular file")
    fixed_val = any(split == "val" for _, split in sources)

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous(out_dir)
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    counts = {s: 0 for s in SPLITS}

    def tasks(bar):
        k = 0
        batches = {s: [] for s in SPLITS}
        for path, split in sources:
            for story in read_stories(path, separator, text_field, bar.update):
                s = split
                if s is None:
                    fall = math.floor((k + 1) * val_fraction) > math.floor(k * val_fraction)
                    s = "val" if fall and not fixed_val else "train"
                    k += 1
                batches[s].append(story)
                if len(batches[s]) >= stories_per_task:
                    yield s, batches[s]
                    batches[s] = []
        for s in SPLITS:
            if batches[s]:
                yield s, batches[s]

    workers = workers or os.cpu_count() or 1
    total_bytes = sum(p.stat().st_size for p, _ in sources)
    with progress_bar(total_bytes, "tokenizing", progress) as bar:
        if workers == 1:
            _init_worker(tokenizer, eos, dtype)
            for split, stories in tasks(bar):
                writers[split].add(_encode_batch(stories))
                counts[split] += len(stories)
        else:
            with multiprocessing.Pool(workers, _init_worker, (str(tokenizer), eos, dtype)) as pool:
                pending = deque()  # results in submission order, so output is independent of workers
                for split, stories in tasks(bar):
                    pending.append((split, pool.apply_async(_encode_batch, (stories,))))
                    counts[split] += len(stories)
                    while len(pending) > 2 * workers:
                        s, result = pending.popleft()
                        writers[s].add(result.get())
                while pending:
                    s, result = pending.popleft()
                    writers[s].add(result.get())
    meta = {
        "format": META_FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": encoder.vocab_size,
        "bos_id": encoder.bos_id, "eos_id": encoder.eos_id, "eos_appended": bool(eos),
        "tokenizer": str(Path(tokenizer).resolve()),
        "stories": counts,
        "splits": {s: writers[s].close() for s in SPLITS},
    }
    with atomic_write(out_dir / META, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for s in SPLITS:
        n = sum(sh["tokens"] for sh in meta["splits"][s])
        log(f"{s}: {counts[s]} stories, {n} tokens in {len(meta['splits'][s])} shard(s)")
    return meta


# ---- reading shards for training ----------------------------------------------------------------

class TokenData:
    """A prepared directory, validated against its meta.json; shards are memory-mapped."""

    def __init__(self, data_dir):
        self.dir = Path(data_dir)
        meta_path = self.dir / META
        if not meta_path.exists():
            hint = (" (an interrupted `llama2 data prepare`? run it again)"
                    if any(self.dir.glob("*_[0-9][0-9][0-9][0-9].bin")) else "")
            raise Llama2Error(f"{self.dir}: not a prepared data directory: no {META}{hint}")
        try:
            self.meta = json.loads(meta_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Llama2Error(f"{meta_path}: invalid JSON: {e}") from None
        if self.meta.get("format") != META_FORMAT or self.meta.get("version") != 1:
            raise Llama2Error(f"{meta_path}: not a {META_FORMAT} version 1 file")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size = int(self.meta["vocab_size"])
        self.splits = {}
        for split in SPLITS:
            arrays = []
            for shard in self.meta["splits"].get(split, []):
                path = self.dir / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                size = path.stat().st_size if path.exists() else None
                if size != expected:
                    raise Llama2Error(f"{path}: shard is {'missing' if size is None else f'{size} bytes'}"
                                      f", {META} says {expected} bytes")
                arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self.splits[split] = arrays

    def tokens(self, split) -> int:
        return sum(a.size for a in self.splits[split])

    def batches(self, split, seq_len):
        return Batches(self.splits[split], seq_len, f"{self.dir} {split} split")


class Batches:
    """Random windows of seq_len+1 tokens from a split's shards read as one stream.

    Which windows a micro-batch holds depends only on (seed, purpose, iteration, micro-step), not on
    the number of processes or on earlier batches: that is what makes resumed and DDP runs equal to
    uninterrupted single-process runs.
    """

    def __init__(self, arrays, seq_len, name):
        self.arrays, self.seq_len = arrays, seq_len
        self.starts = np.cumsum([0] + [a.size for a in arrays])
        self.total = int(self.starts[-1])
        if self.total < seq_len + 1:
            raise Llama2Error(f"{name} has {self.total} tokens, fewer than max_seq_len+1 = {seq_len + 1}")

    def _window(self, start):
        n = self.seq_len + 1
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while n:
            local = start - int(self.starts[i])
            piece = self.arrays[i][local:local + n]
            parts.append(piece)
            n -= piece.size
            start += piece.size
            i += 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def sample(self, batch_size, seed, purpose, iteration, micro):  # -> x, y: int64 [B, T]
        rng = np.random.default_rng([seed, purpose, iteration, micro])
        starts = rng.integers(0, self.total - self.seq_len, size=batch_size)
        chunk = np.stack([self._window(int(s)) for s in starts]).astype(np.int64)
        return chunk[:, :-1], chunk[:, 1:]
