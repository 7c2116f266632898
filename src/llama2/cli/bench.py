"""`llama2 bench`: measure our engine against llama.cpp on this machine (see llama2.benchmarks)."""

import json
import os
from pathlib import Path

from ..errors import UsageError

LEVELS = ("scalar", "avx2", "avx512")  # LLAMA2_ISA values, as llama2.native.LEVELS (not imported here)


def register(sub):
    p = sub.add_parser("bench", help="benchmark the engine against llama.cpp (and `bench serve`)",
                       description="Decode and prefill tok/s, time to first token, peak RSS and the first "
                                   "run after a fresh install, ours and llama.cpp's (llama-cpp-python) on "
                                   "the same files, interleaved, median of --reps runs after a warm-up; "
                                   "ratios above 1 mean ours is better.")
    p.add_argument("--models", default=None,
                   help="comma-separated shapes: stories260K, stories15M, stories42M, stories110M, "
                        "tinyllama-1.1b, llama2-7b (about 25 GB of files: only when named), llama3.2-1b "
                        "(only when named), tiny (a plumbing check); default: all but llama2-7b, "
                        "llama3.2-1b and tiny")
    p.add_argument("--threads", default="2", help="comma-separated thread counts (default 2)")
    p.add_argument("--weights", default=None,
                   help="comma-separated: fp32, int8 (the stories shapes' llama2.c files); f16, bf16 "
                        "(HF folder), q8_0, q4_0, q4_k_m, q6_k (the large shapes' files; default all, "
                        "llama2-7b: q8_0,q4_k_m, llama3.2-1b: f16,q8_0,q4_k_m)")
    p.add_argument("--reps", type=int, default=3, help="runs per measurement, median kept (default 3)")
    p.add_argument("--no-peer", action="store_true", help="measure only ours")
    p.add_argument("--isa", choices=LEVELS, default=None,
                   help="instruction-set level of our kernels (sets LLAMA2_ISA in our child processes)")
    p.add_argument("--peer-python", metavar="PATH", default=None,
                   help="run llama.cpp's children (and its quantizer) under this interpreter, e.g. a venv "
                        "with llama-cpp-python built for AVX2 only (docs/benchmarks.md)")
    p.add_argument("--batch", action="store_true",
                   help="also the multi-row decode rows: 4, 8 and 16 sequences decoding together, tok/s "
                        "of the whole pass (adds a few seconds to each run)")
    p.add_argument("--no-first-run", action="store_true",
                   help="skip the first-run column (a fresh `llama2 run` process to its first byte)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: small models, one run, no peer, no first-run row (under a minute)")
    p.add_argument("--prepare", action="store_true",
                   help="only make the model files the run would use (resumable), time nothing")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--dir", metavar="DIR", help="where the benchmark models are kept "
                                                "(default $LLAMA2_HOME/bench, else ~/.cache/llama2/bench)")
    p.set_defaults(func=run)
    # `llama2 bench ACTION ...`: the other benchmarks (their flags come after the action); each
    # module imports only the standard library and llama2.errors at its top
    from ..benchmarks import finetune, serve, spec, structured

    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    for name, module, help in (
            ("serve", serve, "llama2 serve vs llama-cpp-python's server under concurrent streams"),
            ("structured", structured, "the per-token cost of structured output's token masks"),
            ("spec", spec, "speculative decoding (draft models, prompt lookup) vs plain decoding"),
            ("finetune", finetune, "LoRA training tokens/s and peak RSS, ours vs PEFT + transformers")):
        a = actions.add_parser(name, help=help, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(a)
        a.set_defaults(func=module.run)


def _list(text, flag, cast=str):
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a comma-separated list") from None


def parse(args, have_260k: bool, assets) -> dict:
    """The run's settings from the flags, or a one-line UsageError."""
    from ..benchmarks import engine

    known = (["stories260K"] if have_260k else []) + list(engine.SHAPES) + list(engine.FILE_SHAPES)
    if args.models:
        shapes = []
        names = ["stories260K", *engine.SHAPES, *engine.FILE_SHAPES]
        for s in _list(args.models, "--models"):
            match = {k.lower(): k for k in names}.get(s.lower())
            if match is None:
                raise UsageError(f"--models: unknown shape {s!r} (expected one of {', '.join(names)})")
            if match == "stories260K" and not have_260k:
                raise UsageError(f"--models stories260K: {assets}/stories260K.bin not found "
                                 "(set LLAMA2_ASSETS)")
            shapes.append(match)
        if not shapes:
            raise UsageError("--models: expected at least one shape")
    else:
        shapes = [s for s in known if s not in engine.FILE_SHAPES or not engine.FILE_SHAPES[s].named_only]
    if len(set(shapes)) != len(shapes):
        raise UsageError(f"--models {args.models!r}: a shape is named twice")
    threads = _list(args.threads, "--threads", int)
    if not threads:
        raise UsageError("--threads: expected at least one thread count")
    weights = _list(args.weights, "--weights") if args.weights is not None else None
    allowed = engine.TINYLLAMA_WEIGHTS + engine.bench_files.FILES
    if weights is not None:
        bad = [w for w in weights if w not in allowed]
        if bad or not weights:
            raise UsageError(f"--weights {args.weights!r}: expected a comma-separated list of "
                             f"{', '.join(allowed)}")
        for s in shapes:
            family = engine.bench_files.FILES if s in engine.FILE_SHAPES else engine.TINYLLAMA_WEIGHTS
            if not any(w in family for w in weights):
                raise UsageError(f"--weights {args.weights!r}: none applies to {s} (expected "
                                 f"{', '.join(family)})")
    reps, with_peer = args.reps, not args.no_peer
    if reps < 1 or any(t < 1 for t in threads):
        raise UsageError("--reps and --threads must be at least 1")
    if args.quick:
        shapes = ["stories260K"] if have_260k else ["stories15M"]
        shapes += [] if "stories15M" in shapes else ["stories15M"]
        threads, reps, with_peer, weights = [max(threads)], 1, False, None
    first_run = not (args.no_first_run or args.quick)
    peer_python = args.peer_python
    if peer_python is not None:
        path = Path(peer_python).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UsageError(f"--peer-python {peer_python}: not an executable file (expected a Python "
                             "interpreter, e.g. VENV/bin/python)")
        if args.no_peer:
            raise UsageError("--peer-python and --no-peer contradict each other")
        peer_python = str(path)
    return {"shapes": shapes, "threads": threads, "weights": weights, "reps": reps, "with_peer": with_peer,
            "peer_python": peer_python, "isa": args.isa, "first_run": first_run, "batch": args.batch}


def run(args, io) -> int:
    from ..benchmarks import engine
    from ..benchmarks.child import ChildError
    from ..benchmarks.files import check_disk
    from ..fileio import atomic_write

    assets = Path(os.environ.get("LLAMA2_ASSETS", "../shared/assets"))
    have_260k = (assets / "stories260K.bin").exists()
    s = parse(args, have_260k, assets)
    try:
        level = engine.our_level(s["isa"])
    except ChildError as e:
        if s["isa"]:
            raise UsageError(f"--isa {s['isa']}: {e}") from None
        raise
    with_peer = s["with_peer"]
    if with_peer:
        why = engine.peer_available(s["peer_python"])
        if why:
            if s["peer_python"]:
                raise UsageError(f"--peer-python {s['peer_python']}: {why}")
            io.err(f"llama2 bench: {why}; measuring ours only (--no-peer)\n")
            with_peer = False
    directory = Path(args.dir).expanduser() if args.dir else engine.bench_dir()

    def log(text):
        io.err(text + "\n")

    plan = engine.without_unmakeable(engine.files_plan(s["shapes"], s["weights"], with_peer), directory,
                                     s["peer_python"], log)
    check_disk({shape: engine.files_to_make(kinds, with_peer) for shape, kinds in plan.items()}, directory)

    if args.prepare:
        made = engine.prepare(s["shapes"], plan, with_peer, directory, assets if assets.exists() else None,
                              max(s["threads"]), s["peer_python"], log)
        io.out("".join(f"{shape} {kind}: {path}\n" for shape, kinds in made.items()
                       for kind, path in kinds.items()).encode())
        return 0
    info = {"machine": dict(engine.machine(), ours_level=level, isa_forced=s["isa"]),
            "versions": engine.versions(with_peer, s["peer_python"])}
    rows, checks, errors = engine.run_bench(s["shapes"], s["threads"], s["weights"], s["reps"], with_peer,
                                            directory, assets if assets.exists() else None, log, s["isa"],
                                            s["peer_python"], plan, s["first_run"], s["batch"])
    info.update(rows=rows, checks=checks, errors=errors)
    m, v = info["machine"], info["versions"]
    header = (f"machine: {m['cpu']} ({m['cpu_level']}), {m['cores']} cores, {m['memory_gib']} GiB; "
              f"ours at {level}{' (--isa)' if s['isa'] else ''}; versions: "
              + ", ".join(f"{k} {val}" for k, val in v.items() if k != "llama_cpp_system_info") + "\n"
              + (f"llama.cpp: {v['llama_cpp_system_info']}\n" if "llama_cpp_system_info" in v else "")
              + "\n")
    text = header + engine.table(rows)
    if checks:
        text += "\n" + engine.checks_table(checks)
    if engine.classifier_lines(rows):
        text += "\n" + engine.classifier_lines(rows)
    if errors:
        text += "\n" + "\n".join(f"failed: {e['model']} {e['weights']} {e['engine']}: {e['error']}"
                                 for e in errors) + "\n"
    io.out(text.encode())
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0
