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
    stories260K-q8        stories260K (real weights) with its int8 export as the draft
    stories260K-lookup    stories260K with prompt lookup (--lookup 3) on an input that repeats
    tinyllama-q8_0-q4_0   the TinyLlama shape in Q8_0 with the same weights in Q4_0 as the draft
    tinyllama-lookup      the TinyLlama shape in Q8_0 with prompt lookup
    llama2-7b-tinyllama   the Llama-2-7B shape in Q4_K_M with the TinyLlama shape in Q4_0 (named only)
or any pair with --model MODEL and --draft DRAFT or --lookup N.
Not here yet: a stories260K draft trained by the bench, and llama-cpp-python's
LlamaPromptLookupDecoding on the same input.
"""

import json
import os
import statistics
import time
from pathlib import Path

from ..errors import UsageError

REPEATING = ("Once upon a time there was a little cat. The little cat liked to play in the garden. "
             "One day the little cat saw a big dog. The little cat liked to play in the garden. "
             "The big dog said: the little cat liked to play in the garden.")
PLAIN_PROMPT = "Once upon a time"
# name -> (target (shape, kind) or asset, draft (shape, kind) / asset / None, lookup n, prompt, named only)
PAIRS = {
    "stories260K-q8": ("stories260K.bin", "stories260K-q8.bin", None, PLAIN_PROMPT, False),
    "stories260K-lookup": ("stories260K.bin", None, 3, REPEATING, False),
    "tinyllama-q8_0-q4_0": (("tinyllama-1.1b", "q8_0"), ("tinyllama-1.1b", "q4_0"), None, PLAIN_PROMPT, False),
    "tinyllama-lookup": (("tinyllama-1.1b", "q8_0"), None, 3, REPEATING, False),
    "llama2-7b-tinyllama": (("llama2-7b", "q4_k_m"), ("tinyllama-1.1b", "q4_0"), None, PLAIN_PROMPT, True),
}


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
    p.add_argument("--dir", metavar="DIR", help="where the benchmark's model files are kept")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _resolve(item, directory, assets, log):
    """A pair's file: an asset name, or (shape, kind) made in the bench folder on first use."""
    if isinstance(item, str):
        path = Path(assets) / item
        if not path.exists():
            raise UsageError(f"{item}: not found in {assets} (set LLAMA2_ASSETS)")
        return path, Path(assets) / "tok512.bin"
    from . import files
    from ..hub import resolve
    shape, kind = item
    tok = Path(assets) / files.SHAPES[shape].tokenizer
    tok = tok if tok.exists() else resolve(files.SHAPES[shape].tokenizer, what="tokenizer")
    return files.prepare(shape, [kind], directory, tok, log=log)[kind], tok


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
    return {"pair": name, "tokens": tokens, "same_text": same,
            "acceptance": round(kept / proposed, 3) if proposed else None,
            "accepted_length": round(tokens * reps / steps, 3) if steps else None,
            "plain_tok_s": round(plain_tps, 2), "spec_tok_s": round(spec_tps, 2),
            "ratio": round(spec_tps / plain_tps, 3), "k_max": spec.most,
            "draft_step": round(drafted / plain, 3), "verify_pass": round(verify / plain, 3),
            "break_even": round(break_even(spec.most, plain, drafted, verify), 3)}


def run(args, io) -> int:
    from ..llama import Llama
    from .engine import bench_dir

    if args.reps < 1 or args.max_tokens < 1:
        raise UsageError("--reps and --max-tokens must be at least 1")
    assets = Path(os.environ.get("LLAMA2_ASSETS", "../shared/assets"))
    directory = Path(args.dir).expanduser() if args.dir else bench_dir()

    def log(text):
        io.err(text + "\n")

    jobs = []  # (name, target path, tokenizer, draft path or None, lookup, prompt)
    if args.model is not None:
        if args.draft is None and args.lookup is None:
            raise UsageError("--model: give --draft MODEL or --lookup N")
        prompt = args.prompt or (REPEATING if args.lookup else PLAIN_PROMPT)
        jobs.append(("custom", args.model, args.tokenizer, args.draft, args.lookup, prompt))
    else:
        if args.draft is not None or args.lookup is not None:
            raise UsageError("--draft and --lookup go with --model")
        names = [n.strip() for n in args.pairs.split(",") if n.strip()] if args.pairs else \
            [n for n, p in PAIRS.items() if not p[4]]
        for n in names:
            if n not in PAIRS:
                raise UsageError(f"--pairs: unknown pair {n!r} (expected one of {', '.join(PAIRS)})")
        for n in names:
            target, draft, lookup, prompt, _ = PAIRS[n]
            path, tok = _resolve(target, directory, assets, log)
            draft_path = _resolve(draft, directory, assets, log)[0] if draft is not None else None
            jobs.append((n, path, tok, draft_path, lookup, prompt))
    rows, loaded = [], {}
    for name, path, tok, draft, lookup, prompt in jobs:
        key = (str(path), str(tok))
        if key not in loaded:
            loaded[key] = Llama.load(path, tok, threads=args.threads)
        llama = loaded[key]
        draft_llama = llama._load_draft(draft) if draft is not None else None
        log(f"bench spec: {name} ...")
        rows.append(measure(name, llama, lambda: llama.speculate(draft_llama, lookup, args.draft_max),
                            prompt, args.max_tokens, args.reps))
    cols = ("pair", "tokens", "acceptance", "accepted_length", "plain_tok_s", "spec_tok_s", "ratio", "k_max",
            "draft_step", "verify_pass", "break_even", "same_text")
    lines = ["greedy completions, median of %d; draft_step and verify_pass in target decode steps" % args.reps,
             "  ".join(f"{c:>15}" if i else f"{c:22}" for i, c in enumerate(cols))]
    for r in rows:
        lines.append("  ".join(f"{str(r[c]):>15}" if i else f"{r[c]:22}" for i, c in enumerate(cols)))
    io.out(("\n".join(lines) + "\n").encode())
    if args.json:
        from ..fileio import atomic_write
        with atomic_write(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0
