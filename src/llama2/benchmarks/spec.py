"""`llama2 bench spec`: speculative decoding against plain decoding of the same target.

For each pair (a target and a draft model, or a target with prompt lookup), greedy completions of
the same prompt are timed with and without speculation, interleaved, median of --reps runs; the
two texts must be equal (temperature 0). Reported: the acceptance rate (guesses kept / proposed),
the mean accepted length (tokens per target pass), tokens/s of both and their ratio, the measured
costs of a draft step and of a verification pass of k+1 rows (in target decode steps), and the
break-even acceptance rate: the lowest at which k guesses a pass pay for themselves, from
E(k, a) = (1 - a^(k+1)) / (1 - a) tokens per (k * draft + verify) time against 1 token per step.

Pairs (the TinyLlama and Llama-2-7B shapes' files are the engine benchmark's, made on first use in
the bench folder with llama.cpp's quantizer; see llama2.benchmarks.files):
    tinyllama-q8_0-q4_0     the TinyLlama shape in Q8_0 with the same weights in Q4_0 as the draft
    tinyllama-lookup        the TinyLlama shape in Q8_0 with prompt lookup on an input that repeats,
                            and llama-cpp-python's LlamaPromptLookupDecoding on the same file
    tinyllama-random-draft  the TinyLlama shape in Q8_0 with a random-weight draft (rand-gqa-unshared,
                            the Llama 2 vocabulary): guesses almost never kept, so the adaptive length
                            must back off to plain decoding (ratio at least 0.95: the 5% rule)
    stories260K-trained     stories260K (real weights) with a draft the bench trains with `llama2
                            train` on the shared TinyStories sample (about a minute; kept in the bench
                            folder as stories260K-draft-*/model.bin)
    stories260K-q8          stories260K with its int8 export as the draft
    stories260K-lookup      stories260K's GGUF with prompt lookup on an input that repeats, and
                            llama-cpp-python's LlamaPromptLookupDecoding on the same file
    llama2-7b-tinyllama     the Llama-2-7B shape in Q4_K_M with the TinyLlama shape in Q4_0 (named only)
or any pair with --model MODEL and --draft DRAFT or --lookup N. For the lookup pairs llama-cpp-python
runs in a child (peer.py, under --peer-python when given) after ours, with the same token ids, the
same --max-tokens, greedy, its n-gram size ours and its num_pred_tokens our longest draft.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import Llama2Error, UsageError

REPEATING = ("Once upon a time there was a little cat. The little cat liked to play in the garden. "
             "One day the little cat saw a big dog. The little cat liked to play in the garden. "
             "The big dog said: the little cat liked to play in the garden.")
PLAIN_PROMPT = "Once upon a time"
TRAINED = "trained"  # a pair's draft made by train_draft
SPEC_FLOOR = 0.95  # the target: speculation at most 5% slower than plain decoding, at any acceptance


@dataclass(frozen=True)
class Pair:
    target: object  # an asset's name, or (shape, kind) of llama2.benchmarks.files
    draft: object = None  # the same, or TRAINED; None with lookup
    lookup: int = None  # prompt lookup's n-gram size
    prompt: str = PLAIN_PROMPT
    named_only: bool = False  # large files: only when named in --pairs


PAIRS = {
    "tinyllama-q8_0-q4_0": Pair(("tinyllama-1.1b", "q8_0"), ("tinyllama-1.1b", "q4_0")),
    "tinyllama-lookup": Pair(("tinyllama-1.1b", "q8_0"), lookup=3, prompt=REPEATING),
    "tinyllama-random-draft": Pair(("tinyllama-1.1b", "q8_0"), "rand-gqa-unshared.bin"),
    "stories260K-trained": Pair("stories260K.bin", TRAINED),
    "stories260K-q8": Pair("stories260K.bin", "stories260K-q8.bin"),
    "stories260K-lookup": Pair("stories260K.gguf", lookup=3, prompt=REPEATING),
    "llama2-7b-tinyllama": Pair(("llama2-7b", "q4_k_m"), ("tinyllama-1.1b", "q4_0"), named_only=True),
}

# The trained draft: a quarter of stories260K's layers at three quarters of its width, stories260K's
# tokenizer; `llama2 train` options (CPU, float32, fixed seed: the same weights on every machine).
# About a minute of training on two cores; its validation loss is about 3.9 (stories260K's: 1.3).
DRAFT_RECIPE = {"dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128, "batch_size": 32,
                "gradient_accumulation_steps": 1, "max_iters": 200, "warmup_iters": 20, "learning_rate": 4e-3,
                "eval_interval": 200, "eval_iters": 4, "log_interval": 50, "device": "cpu", "seed": 1337}


def add_arguments(p):
    p.add_argument("--pairs", help=f"comma-separated: {', '.join(PAIRS)} (default: all but those named only)")
    p.add_argument("--model", metavar="MODEL", help="bench this target instead of the named pairs")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--draft", metavar="MODEL", help="with --model: its draft model")
    how.add_argument("--lookup", type=int, metavar="N", help="with --model: prompt lookup of N-grams")
    p.add_argument("-z", "--tokenizer", help="with --model: its tokenizer")
    p.add_argument("--prompt", help="with --model: the prompt (default: a text that repeats for --lookup)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (default 128)")
    p.add_argument("--draft-max", type=int, default=None, metavar="K",
                   help="the longest draft (default: speculative.MAX_DRAFT)")
    p.add_argument("--reps", type=int, default=3, help="timed runs of each, median kept (default 3)")
    p.add_argument("--threads", type=int, help="compute threads (default: the cores available)")
    p.add_argument("--no-peer", action="store_true", help="no llama-cpp-python runs for the lookup pairs")
    p.add_argument("--peer-python", metavar="PATH", help="run llama-cpp-python's child under this interpreter")
    p.add_argument("--dir", metavar="DIR", help="where the benchmark's model files are kept")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def train_draft(directory, assets, threads: int, log, recipe=None) -> Path:
    """The trained draft's model.bin: stories260K's tokenizer, the TinyStories sample, `llama2
    train` with `recipe` (DRAFT_RECIPE), in child processes (torch stays out of this one). Made once
    into a folder named for the recipe, written under a temporary name and renamed when done."""
    recipe = DRAFT_RECIPE if recipe is None else recipe
    settings = zlib.crc32(json.dumps(recipe, sort_keys=True).encode())  # another recipe, another file
    name = "stories260K-draft-{dim}x{n_layers}-{max_iters}-".format(**recipe) + f"{settings:08x}"
    folder = Path(directory) / name
    if (folder / "model.bin").exists():
        return folder / "model.bin"
    sample, spm = Path(assets) / "tinystories_train_sample_2MiB.txt", Path(assets) / "tok512.model"
    for need in (sample, spm):
        if not need.exists():
            raise UsageError(f"{need.name}: not found in {assets} (set LLAMA2_ASSETS)")
    Path(directory).mkdir(parents=True, exist_ok=True)
    log(f"bench spec: training {name} with llama2 train (about a minute) ...")
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=directory) as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / name
        llama2 = [sys.executable, "-m", "llama2"]
        steps = [[*llama2, "data", "prepare", str(sample), "--out", str(data), "--tokenizer", str(spm),
                  "--workers", "1"],
                 [*llama2, "train", "--data", str(data), "--out_dir", str(out), "--tokenizer", str(spm),
                  "--num_threads", str(threads), *(f"--{k}={v}" for k, v in recipe.items())]]
        for cmd in steps:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                lines = p.stderr.strip().splitlines() or [f"exit code {p.returncode}"]
                raise Llama2Error(f"bench spec: llama2 {cmd[3]} of the draft failed: {lines[-1]}")
        os.replace(out, folder)
    return folder / "model.bin"


def _resolve(item, directory, assets, threads, log):
    """A pair's file and its tokenizer: an asset (tok512 for a llama2.c file, a GGUF's own), the
    trained draft, or (shape, kind) made in the bench folder on first use."""
    if item == TRAINED:
        return train_draft(directory, assets, threads, log), Path(assets) / "tok512.bin"
    if isinstance(item, str):
        path = Path(assets) / item
        if not path.exists():
            raise UsageError(f"{item}: not found in {assets} (set LLAMA2_ASSETS)")
        return path, None if path.suffix == ".gguf" else Path(assets) / "tok512.bin"
    from . import files
    from ..hub import resolve
    shape, kind = item
    tok = Path(assets) / files.SHAPES[shape].tokenizer
    tok = tok if tok.exists() else resolve(files.SHAPES[shape].tokenizer, what="tokenizer")
    return files.prepare(shape, [kind], directory, tok, log=log)[kind], tok


def peer_lookup(path, f32, ids, max_tokens, ngram, draft_max, reps, threads, python=None) -> dict:
    """llama-cpp-python's LlamaPromptLookupDecoding and plain decoding on the GGUF `path`, greedy,
    from the token `ids` (peer.py's lookup mode, in a child): {"plain"|"lookup": {"seconds",
    "text", "tokens"}}. An F32 file (`f32`) runs with llama.cpp's extra buffer types, a quantized
    one without (the engine benchmark's rule: its AMX path crashes on multi-token batches in our VMs)."""
    from .child import ChildError, child_command, last_line

    impl = "llama_cpp" if f32 else "llama_cpp_no_extra_bufts"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompt": list(ids), "max_tokens": max_tokens, "ngram": ngram, "draft_max": draft_max,
                   "reps": reps}, f)
    try:
        cmd, env = child_command("llama_cpp", python)
        env.update(OMP_NUM_THREADS=str(threads))
        p = subprocess.run([*cmd, "lookup", impl, str(path), str(threads), f.name], capture_output=True,
                           text=True, env=env)
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        raise ChildError(f"llama-cpp-python's lookup child failed on {Path(path).name}: {last_line(p)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _timed(llama, prompt, max_tokens) -> tuple:
    t0 = time.perf_counter()
    r = llama.create_completion(prompt, max_tokens=max_tokens, temperature=0)
    return time.perf_counter() - t0, r["choices"][0]["text"], r["usage"]["completion_tokens"]


def _step_costs(llama, draft, k, prompt) -> tuple:
    """(plain decode step, draft step, verification pass of k+1 rows) in seconds, medians."""
    m = llama.model
    ids = llama.encode(prompt)

    def decode_step(model, rows):
        cache = model.new_cache()
        model.forward(ids, cache)
        times = []
        for i in range(8):
            t0 = time.perf_counter()
            model.forward(ids[1:1 + rows] if len(ids) > rows else [ids[-1]] * rows, cache)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    plain = decode_step(m, 1)
    verify = decode_step(m, k + 1)
    drafted = decode_step(draft, 1) if draft is not None else 0.0
    return plain, drafted, verify


def break_even(k: int, plain: float, drafted: float, verify: float) -> float:
    """The acceptance rate a at which k guesses a pass give plain decoding's speed (bisection on
    E(k, a) / (k * drafted + verify) = 1 / plain); 0 if even none kept pays, 1 if none does."""
    cost = (k * drafted + verify) / plain

    def tokens(a):
        return k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    if tokens(0.0) >= cost:
        return 0.0
    if tokens(1.0) < cost:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens(mid) < cost else (lo, mid)
    return hi


def measure(name, llama, speculate, prompt, max_tokens, reps) -> dict:
    """One pair: plain and speculative runs interleaved (a warm-up of each first)."""
    spec = speculate()
    from ..llama import Llama
    fast = Llama(llama.model, llama.tokenizer, llama.checkpoint, name=llama.name, speculator=spec)
    _timed(llama, prompt, max_tokens), _timed(fast, prompt, max_tokens)
    plain_s, spec_s, same, tokens = [], [], True, 0
    steps = proposed = kept = 0
    for _ in range(reps):
        t, text, tokens = _timed(llama, prompt, max_tokens)
        plain_s.append(t)
        fast.speculator = spec = speculate()  # fresh counts and a fresh length policy
        t, fast_text, _ = _timed(fast, prompt, max_tokens)
        spec_s.append(t)
        same &= fast_text == text
        steps, proposed, kept = steps + spec.steps, proposed + spec.proposed, kept + spec.kept
    draft = getattr(spec.proposer, "model", None)
    plain, drafted, verify = _step_costs(llama, draft, spec.most, prompt)
    plain_tps, spec_tps = tokens / statistics.median(plain_s), tokens / statistics.median(spec_s)
    return {"pair": name, "tokens": tokens, "same_text": same, "text": text,
            "acceptance": round(kept / proposed, 3) if proposed else None,
            "accepted_length": round(tokens * reps / steps, 3) if steps else None,
            "plain_tok_s": round(plain_tps, 2), "spec_tok_s": round(spec_tps, 2),
            "ratio": round(spec_tps / plain_tps, 3), "k_max": spec.most,
            "draft_step": round(drafted / plain, 3), "verify_pass": round(verify / plain, 3),
            "break_even": round(break_even(spec.most, plain, drafted, verify), 3)}


def run(args, io) -> int:
    from ..llama import Llama
    from .engine import bench_dir, peer_available

    if args.reps < 1 or args.max_tokens < 1:
        raise UsageError("--reps and --max-tokens must be at least 1")
    assets = Path(os.environ.get("LLAMA2_ASSETS", "../shared/assets"))
    directory = Path(args.dir).expanduser() if args.dir else bench_dir()
    threads = args.threads or len(os.sched_getaffinity(0))

    def log(text):
        io.err(text + "\n")

    jobs = []  # (name, target path, tokenizer, draft path or None, lookup, prompt)
    if args.model is not None:
        if args.draft is None and args.lookup is None:
            raise UsageError("--model: give --draft MODEL or --lookup N")
        prompt = args.prompt or (REPEATING if args.lookup else PLAIN_PROMPT)
        jobs.append(("custom", Path(args.model), args.tokenizer, args.draft, args.lookup, prompt))
    else:
        if args.draft is not None or args.lookup is not None:
            raise UsageError("--draft and --lookup go with --model")
        names = [n.strip() for n in args.pairs.split(",") if n.strip()] if args.pairs else \
            [n for n, p in PAIRS.items() if not p.named_only]
        for n in names:
            if n not in PAIRS:
                raise UsageError(f"--pairs: unknown pair {n!r} (expected one of {', '.join(PAIRS)})")
        for n in names:
            pair = PAIRS[n]
            path, tok = _resolve(pair.target, directory, assets, threads, log)
            draft = _resolve(pair.draft, directory, assets, threads, log)[0] if pair.draft is not None else None
            jobs.append((n, path, tok, draft, pair.lookup, pair.prompt))
    peer_missing = "" if args.no_peer or not any(j[4] for j in jobs) else peer_available(args.peer_python)
    if peer_missing:
        log(f"bench spec: skipping llama-cpp-python's lookup runs: {peer_missing}")
    rows, loaded = [], {}
    for name, path, tok, draft, lookup, prompt in jobs:
        key = (str(path), str(tok))
        if key not in loaded:
            loaded[key] = Llama.load(path, tok, threads=threads)
        llama = loaded[key]
        draft_llama = llama._load_draft(draft) if draft is not None else None
        log(f"bench spec: {name} ...")
        row = measure(name, llama, lambda: llama.speculate(draft_llama, lookup, args.draft_max),
                      prompt, args.max_tokens, args.reps)
        if lookup and not (args.no_peer or peer_missing) and path.suffix == ".gguf":
            log(f"bench spec: {name}: llama-cpp-python's LlamaPromptLookupDecoding ...")
            peer = peer_lookup(path, llama.checkpoint.dtype == "fp32", llama.encode(prompt), args.max_tokens,
                               lookup, row["k_max"], args.reps, threads, args.peer_python)
            tps = {k: v["tokens"] / v["seconds"] for k, v in peer.items()}
            row.update(peer_plain_tok_s=round(tps["plain"], 2), peer_lookup_tok_s=round(tps["lookup"], 2),
                       peer_ratio=round(tps["lookup"] / tps["plain"], 3),
                       vs_peer=round(row["spec_tok_s"] / tps["lookup"], 3),
                       peer_same_text=peer["lookup"]["text"] == row["text"])
        rows.append(row)
    io.out(table(rows, args.reps).encode())
    if args.json:
        from ..fileio import atomic_write
        with atomic_write(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


def table(rows, reps) -> str:
    """The rows as text: every pair, then the lookup pairs against llama-cpp-python, then the 5% rule."""
    def block(cols, rows):
        out = ["  ".join(f"{c:>15}" if i else f"{c:22}" for i, c in enumerate(cols))]
        for r in rows:
            out.append("  ".join(f"{str(r[c]):>15}" if i else f"{r[c]:22}" for i, c in enumerate(cols)))
        return out
    lines = [f"greedy completions, median of {reps}; draft_step and verify_pass in target decode steps",
             *block(("pair", "tokens", "acceptance", "accepted_length", "plain_tok_s", "spec_tok_s", "ratio",
                     "k_max", "draft_step", "verify_pass", "break_even", "same_text"), rows)]
    peers = [r for r in rows if "vs_peer" in r]
    if peers:
        lines += ["", "prompt lookup against llama-cpp-python's LlamaPromptLookupDecoding (same file, ids, "
                      "max tokens; vs_peer: our lookup tok/s over its)",
                  *block(("pair", "spec_tok_s", "peer_plain_tok_s", "peer_lookup_tok_s", "peer_ratio", "vs_peer",
                          "peer_same_text"), peers)]
    slow = [r["pair"] for r in rows if r["ratio"] < SPEC_FLOOR]
    lines += ["", f"never more than {1 - SPEC_FLOOR:.0%} slower than plain decoding (ratio >= {SPEC_FLOOR}): "
                  + (f"NOT MET by {', '.join(slow)}" if slow else "met by every pair")]
    return "\n".join(lines) + "\n"
