"""`llama2 bench`: measure our engine against llama.cpp on this machine (see llama2.benchmarks)."""

import json
import sys
from pathlib import Path

from ..errors import UsageError


def register(sub):
    p = sub.add_parser("bench", help="benchmark the engine against llama.cpp (and `bench serve`)",
                       description="Decode and prefill tok/s, time to first token and peak RSS, ours "
                                   "and llama.cpp's (llama-cpp-python) on the same weights, interleaved, "
                                   "median of --reps runs after a warm-up; ratios above 1 mean ours is better.")
    p.add_argument("--models", default=None,
                   help="comma-separated shapes (default: stories260K if available, stories15M, "
                        "stories42M, stories110M)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--weights", default="fp32,int8", help="fp32, int8 or both (default both)")
    p.add_argument("--reps", type=int, default=3, help="runs per measurement, median kept (default 3)")
    p.add_argument("--no-peer", action="store_true", help="measure only ours")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: small models, one run, no peer (under a minute)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--dir", metavar="DIR", help="where the benchmark models are kept "
                                                "(default $LLAMA2_HOME/bench)")
    p.set_defaults(func=run)
    # `llama2 bench serve ...`: the server benchmark (its flags come after the action)
    from ..benchmarks import serve  # imports only the standard library at the top

    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    a = actions.add_parser("serve", help="llama2 serve vs llama-cpp-python's server under concurrent streams",
                           description=serve.__doc__.split("\n\n")[0])
    serve.add_arguments(a)
    a.set_defaults(func=serve.run)
    from ..benchmarks import structured  # `llama2 bench structured`: the per-token cost of masking

    a = actions.add_parser("structured", help="the per-token cost of structured output's token masks",
                           description=structured.__doc__.split("\n\n")[0])
    structured.add_arguments(a)
    a.set_defaults(func=structured.run)


def _list(text, flag, cast=str):
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a comma-separated list") from None


def run(args, io) -> int:
    import os

    from ..benchmarks import engine
    from ..fileio import atomic_write

    assets = Path(os.environ.get("LLAMA2_ASSETS", "../shared/assets"))
    have_260k = (assets / "stories260K.bin").exists()
    shapes = _list(args.models, "--models") if args.models else (
        (["stories260K"] if have_260k else []) + list(engine.SHAPES))
    threads = _list(args.threads, "--threads", int)
    weights = _list(args.weights, "--weights")
    reps, with_peer = args.reps, not args.no_peer
    if args.quick:
        shapes = ["stories260K"] if have_260k else ["stories15M"]
        shapes += [] if "stories15M" in shapes else ["stories15M"]
        threads, reps, with_peer = [max(threads)], 1, False
    for s in shapes:
        if s not in engine.SHAPES and s != "stories260K":
            raise UsageError(f"--models: unknown shape {s!r} (expected stories260K or {', '.join(engine.SHAPES)})")
        if s == "stories260K" and not have_260k:
            raise UsageError(f"--models stories260K: {assets}/stories260K.bin not found (set LLAMA2_ASSETS)")
    if any(w not in ("fp32", "int8") for w in weights):
        raise UsageError(f"--weights {args.weights!r}: expected fp32 and/or int8")
    if reps < 1 or any(t < 1 for t in threads):
        raise UsageError("--reps and --threads must be at least 1")
    if with_peer:
        why = engine.peer_available()
        if why:
            io.err(f"llama2 bench: {why}; measuring ours only (--no-peer)\n")
            with_peer = False

    def log(text):
        io.err(text + "\n")

    directory = Path(args.dir) if args.dir else engine.bench_dir()
    rows = engine.run_bench(shapes, threads, weights, reps, with_peer, directory,
                            assets if assets.exists() else None, log)
    info = {"machine": engine.machine(), "versions": engine.versions(with_peer), "rows": rows}
    header = (f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, "
              f"{info['machine']['memory_gib']} GiB; versions: "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n\n")
    io.out((header + engine.table(rows)).encode())
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0
