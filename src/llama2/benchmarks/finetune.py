"""`llama2 bench finetune`: LoRA training speed and peak memory on CPU, ours (`llama2 finetune`) against
PEFT + transformers on the same base, same rank, targets, sequence, batch, optimizer and threads.

Each measurement is a fresh child process (this module run as a script) that trains one warm-up step
and then --steps timed steps, and reports its mean step time and its own peak RSS (getrusage, so the
loading of the base counts too). Ours runs `llama2 finetune` itself (in-process in the child, its
step times read back from metrics.jsonl, which times the steps only); PEFT's child loads the HF folder
with transformers in float32 and in bfloat16 (`torch_dtype`), wraps it with peft's LoraConfig and runs
the same step: forward with labels, backward, gradient clipping at 1.0 (train's default), AdamW
(fused, as ours and as transformers' Trainer defaults to).
Children run interleaved (ours, PEFT fp32, PEFT bf16), --reps rounds, the median kept.

The base: one HF bf16 folder per shape (random weights, files.py), read by both sides: ours maps it in
place (bf16 matrices dequantized a tile at a time), PEFT widens it to its dtype. stories15M and
stories110M are written here from the presets; TinyLlama-1.1B's folder is the engine benchmark's.
`--qlora-7b` adds ours alone on the Llama-2-7B shape's Q4_K_M GGUF (llama.cpp's quantizer makes it,
about 17 GB of files in all) at sequence 512 with --checkpointing: seconds per step and peak RSS.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UsageError
from .child import last_line

SHAPES = ("stories15M", "stories110M", "tinyllama-1.1b")  # measured by default, in this order
QUICK_SHAPE = "tiny"  # files.SHAPES' plumbing shape (seconds a step), for --quick
QLORA_SHAPE, QLORA_KIND, QLORA_SEQ = "llama2-7b", "q4_k_m", 512  # --qlora-7b
PEFT_SIDES = {"peft_fp32": "float32", "peft_bf16": "bfloat16"}  # PEFT's base, as transformers' torch_dtype
LEARNING_RATE = 2e-4  # both sides; the value does not change a step's cost
DATA_WORDS = 4000  # the synthetic training text for ours: far more tokens than a few windows use


def add_arguments(p):
    p.add_argument("--models", help=f"comma-separated shapes: {', '.join(SHAPES)} (default all)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run, after a warm-up step (default 3)")
    p.add_argument("--reps", type=int, default=3, help="runs of each side, interleaved, median kept (default 3)")
    p.add_argument("--threads", type=int, default=2, help="compute threads of every child (default 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on every linear layer (default 8)")
    p.add_argument("--no-peer", action="store_true", help="measure only ours")
    p.add_argument("--qlora-7b", action="store_true",
                   help=f"also ours on the Llama-2-7B shape's Q4_K_M GGUF, sequence {QLORA_SEQ}, "
                        "--checkpointing (about 17 GB of files, made on first use)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: a tiny shape, sequence 32, one step, one run (seconds; with "
                        "--qlora-7b, the tiny shape's Q4_K_M)")
    p.add_argument("--dir", metavar="DIR", help="where the benchmark models are kept "
                                                "(default $LLAMA2_HOME/bench, else ~/.cache/llama2/bench)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


# -- the children -------------------------------------------------------------------------------------

def _peak_rss_mb(who: str = "self") -> float:
    """Peak RSS of this process ("self") or of its largest finished child ("children"), MB."""
    import resource  # Unix only: imported by the children, not when the CLI registers this action

    kind = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    return resource.getrusage(kind).ru_maxrss / 1024  # Linux reports KiB


def child_ours(base, tokenizer, data, seq_len, batch, steps, rank, threads, checkpointing) -> dict:
    """`llama2 finetune` on `base` for a warm-up step and `steps` more, as a process of its own (the
    command as users run it; its peak RSS); the steps' seconds from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "llama2", "finetune", str(base), "--data", str(data), "--out", out, "--tokenizer", str(tokenizer),
                "--seq-len", str(seq_len), "--batch_size", str(batch), "--max_iters", str(steps + 1),
                "--lora-rank", str(rank), "--lora-alpha", str(2 * rank), "--learning_rate", str(LEARNING_RATE),
                "--warmup_iters", "0", "--eval_iters", "0", "--val-fraction", "0", "--log_interval", "1",
                "--num_threads", str(threads)] + (["--checkpointing"] if checkpointing else [])
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llama2 finetune failed: {last_line(p)}")
        entries = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        trained = _trained_values(Path(out))
    tokens = seq_len * batch
    step_s = [tokens / e["tokens_per_s"] for e in entries if "tokens_per_s" in e]
    return {"step_s": step_s[1:], "rss_mb": _peak_rss_mb("children"), "trainable": trained}


def _trained_values(out) -> int:  # the values ckpt.pt keeps of the model: the adapters' factors
    import torch

    from ..train.trainer import CKPT

    state = torch.load(out / CKPT, map_location="cpu", weights_only=True)["model"]
    return sum(t.numel() for t in state.values())


def child_peft(folder, dtype, seq_len, batch, steps, rank, threads) -> dict:
    """PEFT LoRA on transformers' LlamaForCausalLM of `folder` in `dtype`: the same step as ours."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..formats.adapter import HF_MODULES
    from ..train.options import TARGETS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
    loaded = model.get_input_embeddings().weight.dtype
    if loaded != getattr(torch, dtype):
        raise SystemExit(f"transformers loaded {folder} in {loaded}, not {dtype}")
    targets = [HF_MODULES[name].rpartition(".")[2] for name in TARGETS.values()]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0, fused=True)  # as ours
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    step_s = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        step_s.append(time.perf_counter() - t0)
    return {"step_s": step_s[1:], "rss_mb": _peak_rss_mb(), "trainable": sum(p.numel() for p in trainable)}


def child_main(argv) -> int:
    """`ours BASE TOKENIZER DATA SEQ BATCH STEPS RANK THREADS CHECKPOINTING` or
    `peft FOLDER DTYPE SEQ BATCH STEPS RANK THREADS`; prints one JSON line."""
    if argv[0] == "ours":
        base, tok, data, *n = argv[1:]
        result = child_ours(base, tok, data, *map(int, n[:5]), checkpointing=n[5] == "1")
    else:
        folder, dtype, *n = argv[1:]
        result = child_peft(folder, dtype, *map(int, n))
    print(json.dumps(result))
    return 0


def run_child(args, threads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-m", "llama2.benchmarks.finetune", *map(str, args)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        from .child import ChildError, last_line
        raise ChildError(f"bench finetune: the {args[0]} child failed: {last_line(p)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the parent ---------------------------------------------------------------------------------------

def peft_missing() -> str:
    """'' when peft and transformers import, else why not."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"PEFT is not importable ({type(e).__name__}: {e}); pip install peft transformers"
    return ""


def synthetic_text(path, words=DATA_WORDS):
    """Plain text for ours to train on (what it says does not change a step's cost)."""
    import random

    vocab = ("once upon a time there was little girl boy who liked to play in the park with her his "
             "dog cat ball one day they saw big red tree and said hello friend happy sad went home").split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(words // 10)]
    Path(path).write_text(" ".join(sentences) + "\n")


def base_folder(shape, directory, assets, log):
    """(HF bf16 folder, tokenizer.bin) of `shape`, written on first use."""
    from dataclasses import replace

    from . import files
    from ..config import PRESETS
    from .engine import _tokenizers

    if shape in files.SHAPES:
        tok, spm = _tokenizers(shape, assets)
        return files.prepare(shape, ["bf16"], directory, tok, spm, log=log)["bf16"], tok
    tok, spm = _tokenizers("tinyllama-1.1b", assets)  # the stories shapes' Llama 2 vocabulary
    folder = Path(directory) / f"{shape}-hf-bf16"
    if not folder.exists():
        log(f"{shape}: writing {folder.name} ...")
        files.write_hf_bf16(replace(PRESETS[shape], seq_len=max(PRESETS[shape].seq_len, 1024)), folder,
                            spm_model=spm)
    return folder, tok


def _mean_tok_s(result, tokens) -> float:
    return tokens / statistics.fmean(result["step_s"])


def measure_shape(shape, folder, tok, data, s, with_peer, log) -> dict:
    """One row: ours and PEFT (fp32, bf16) interleaved, --reps rounds, medians."""
    tokens = s["seq_len"] * s["batch"]
    common = [s["seq_len"], s["batch"], s["steps"], s["rank"], s["threads"]]
    sides = {"ours": ["ours", folder, tok, data, *common, 0]}
    if with_peer:
        sides.update({name: ["peft", folder, dtype, *common] for name, dtype in PEFT_SIDES.items()})
    samples = {name: [] for name in sides}
    for rep in range(s["reps"]):
        for name, args in sides.items():
            r = run_child(args, s["threads"])
            samples[name].append(r)
            log(f"{shape} run {rep + 1}/{s['reps']} {name}: {_mean_tok_s(r, tokens):.1f} tokens/s, "
                f"peak RSS {r['rss_mb']:,.0f} MB")
    trained = {name: rs[0]["trainable"] for name, rs in samples.items()}
    if len(set(trained.values())) > 1:
        from .child import ChildError
        raise ChildError(f"{shape}: the sides train different numbers of values ({trained}): not the same "
                         "adapters, not comparing them")
    row = {"model": shape, "trainable": trained["ours"]}
    for name, rs in samples.items():
        row[f"{name}_tok_s"] = round(statistics.median(_mean_tok_s(r, tokens) for r in rs), 2)
        row[f"{name}_rss_mb"] = round(statistics.median(r["rss_mb"] for r in rs), 1)
    if with_peer:
        row["ratio_fp32"] = round(row["ours_tok_s"] / row["peft_fp32_tok_s"], 3)
        row["ratio_bf16"] = round(row["ours_tok_s"] / row["peft_bf16_tok_s"], 3)
        row["rss_ratio_bf16"] = round(row["ours_rss_mb"] / row["peft_bf16_rss_mb"], 3)
    return row


def measure_qlora(directory, assets, data, s, log) -> dict:
    """Ours alone on a Q4_K_M GGUF (the Llama-2-7B shape's; --quick: the tiny shape's) with
    --checkpointing."""
    from . import files
    from .engine import _tokenizers, file_mb

    shape, seq_len = s["qlora"]
    tok, spm = _tokenizers(shape, assets)
    files.check_disk({shape: [QLORA_KIND]}, directory)
    path = files.prepare(shape, [QLORA_KIND], directory, tok, spm, s["threads"], log=log)[QLORA_KIND]
    runs = []
    for rep in range(s["reps"]):
        runs.append(run_child(["ours", path, tok, data, seq_len, 1, s["steps"], s["rank"], s["threads"], 1],
                              s["threads"]))
        log(f"{shape} {QLORA_KIND} run {rep + 1}/{s['reps']}: "
            f"{statistics.fmean(runs[-1]['step_s']):.1f} s a step, peak RSS {runs[-1]['rss_mb']:,.0f} MB")
    return {"model": shape, "weights": QLORA_KIND, "seq_len": seq_len, "checkpointing": True,
            "s_per_step": round(statistics.median(statistics.fmean(r["step_s"]) for r in runs), 3),
            "rss_mb": round(statistics.median(r["rss_mb"] for r in runs), 1), "file_mb": file_mb(path)}


def settings(args) -> dict:
    if args.quick:
        shapes = [QUICK_SHAPE]
    elif args.models:
        shapes = [m.strip() for m in args.models.split(",") if m.strip()]
        for m in shapes:
            if m not in SHAPES:
                raise UsageError(f"--models: unknown shape {m!r} (expected some of {', '.join(SHAPES)})")
        if not shapes:
            raise UsageError("--models: expected at least one shape")
    else:
        shapes = list(SHAPES)
    for flag in ("steps", "reps", "threads", "seq_len", "batch_size", "lora_rank"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    s = {"shapes": shapes, "steps": args.steps, "reps": args.reps, "threads": args.threads,
         "seq_len": args.seq_len, "batch": args.batch_size, "rank": args.lora_rank,
         "qlora": (QLORA_SHAPE, QLORA_SEQ) if args.qlora_7b else None}
    if args.quick:
        s.update(steps=1, reps=1, seq_len=32, qlora=(QUICK_SHAPE, 32) if args.qlora_7b else None)
    return s


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llama2", "torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _fmt(v, unit=""):
    return "-" if v is None else f"{v:,.1f}{unit}" if v >= 100 else f"{v:.3g}{unit}"


def table(rows, s) -> str:
    lines = [f"LoRA rank {s['rank']} on q,k,v,o,gate,up,down, sequence {s['seq_len']}, batch {s['batch']}, "
             f"AdamW, {s['threads']} threads; mean of {s['steps']} steps after a warm-up step, median of "
             f"{s['reps']} runs; tok/s ratios above 1 and RSS ratios below 1 mean ours is better", "",
             "| model | ours tok/s | PEFT fp32 tok/s | PEFT bf16 tok/s | ours / PEFT fp32 | ours / PEFT bf16 "
             "| ours RSS MB | PEFT fp32 RSS MB | PEFT bf16 RSS MB | RSS ours / PEFT bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = [r.get(k) for k in ("ratio_fp32", "ratio_bf16")]
        lines.append(f"| {r['model']} | {_fmt(r['ours_tok_s'])} | {_fmt(r.get('peft_fp32_tok_s'))} | "
                     f"{_fmt(r.get('peft_bf16_tok_s'))} | {_fmt(ratio[0], 'x')} | {_fmt(ratio[1], 'x')} | "
                     f"{_fmt(r['ours_rss_mb'])} | {_fmt(r.get('peft_fp32_rss_mb'))} | "
                     f"{_fmt(r.get('peft_bf16_rss_mb'))} | {_fmt(r.get('rss_ratio_bf16'), 'x')} |")
    return "\n".join(lines) + "\n"


def run(args, io) -> int:
    from .engine import bench_dir, machine

    s = settings(args)
    assets = Path(os.environ.get("LLAMA2_ASSETS", "../shared/assets"))
    assets = assets if assets.exists() else None
    directory = Path(args.dir).expanduser() if args.dir else bench_dir()

    def log(text):
        io.err(text + "\n")

    with_peer = not args.no_peer
    why = peft_missing() if with_peer else ""
    if why:
        log(f"llama2 bench finetune: {why}; measuring ours only (--no-peer)")
        with_peer = False
    info = {"machine": machine(), "versions": versions(), "settings": s, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.txt"
        synthetic_text(data)
        for shape in s["shapes"]:
            folder, tok = base_folder(shape, directory, assets, log)
            info["rows"].append(measure_shape(shape, folder, tok, data, s, with_peer, log))
        if s["qlora"]:
            info["qlora"] = measure_qlora(directory, assets, data, s, log)
    m, v = info["machine"], info["versions"]
    text = (f"machine: {m['cpu']} ({m['cpu_level']}), {m['cores']} cores, {m['memory_gib']} GiB; versions: "
            + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "\n\n" + table(info["rows"], s))
    q = info.get("qlora")
    if q:
        text += (f"\nQLoRA {q['model']} {q['weights']} ({q['file_mb']:,.0f} MB file), sequence {q['seq_len']}, "
                 f"--checkpointing: {q['s_per_step']} s a step, peak RSS {q['rss_mb']:,.0f} MB "
                 f"(file + {(q['rss_mb'] - q['file_mb']) / 1024:.1f} GiB)\n")
    io.out(text.encode())
    if args.json:
        from ..fileio import atomic_write
        with atomic_write(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
