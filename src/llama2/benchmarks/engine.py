"""`llama2 bench`: our engine against llama.cpp (llama-cpp-python) on the same weights, same machine.

Random-weight checkpoints of the stories15M/42M/110M shapes (fixed seed), plus stories260K when the
shared assets are there, are written once as llama2.c files (fp32 version 1, int8 version 2 with
groups of 32) and as GGUF (F32, Q8_0: blocks of 32) for llama.cpp. Every measurement runs in a fresh
child process (so neither engine's thread pools or memory disturb the other), ours and the peer's
interleaved, repeated, and the median kept. A child loads the model, runs a short prompt and one
greedy token (time to first token, from the child's spawn), takes one decode step untimed (ours loads
its compiled kernels there; the step's time is reported beside the table), decodes 256 greedy tokens
(decode tok/s), runs a 128- and a 512-token prompt twice each, timing the second (prefill tok/s),
and reports its peak RSS. Before timing, llama.cpp's greedy ids on the F32 GGUF must equal ours.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import PRESETS

SHAPES = ("stories15M", "stories42M", "stories110M")
METRICS = ("decode", "prefill128", "prefill512", "ttft", "rss")
HIGHER_IS_BETTER = {"decode": True, "prefill128": True, "prefill512": True, "ttft": False, "rss": False}
UNITS = {"decode": "tok/s", "prefill128": "tok/s", "prefill512": "tok/s", "ttft": "s", "rss": "MB"}
GROUP = 32  # int8 group size on both sides (llama.cpp's Q8_0 block)
SHORT_PROMPT = 8
DECODE_TOKENS = 256
CHECK_TOKENS = 24


@dataclass(frozen=True)
class Case:
    model: str  # shape name
    weights: str  # fp32 | int8
    threads: int


def bench_dir() -> Path:
    from ..hub import cache_dir

    return cache_dir() / "bench"


def model_files(shape: str, directory: Path, assets: Path = None, gguf: bool = True) -> dict:
    """Write (once) the checkpoint and GGUF files of `shape`: {"fp32", "int8", "gguf-fp32",
    "gguf-int8", "tokenizer"} paths. Weights are N(0, 0.02) from a fixed seed; stories260K is real."""
    from .. import checkpoint
    from ..export import CheckpointSource, export
    from ..errors import FormatError
    from ..hub import resolve
    from ..tokenizer_export import load_vocab

    directory.mkdir(parents=True, exist_ok=True)
    if shape == "stories260K":
        src = Path(assets) / "stories260K.bin"
        tok = Path(assets) / "tok512.bin"
    else:
        src = directory / f"{shape}-fp32.bin"
        tok = resolve("tokenizer.bin", what="tokenizer") if assets is None or not (
            Path(assets) / "tokenizer.bin").exists() else Path(assets) / "tokenizer.bin"
        if not src.exists():
            # seq_len 1024 at least, so that a 512-token prompt and 256 decoded tokens fit
            config = replace(PRESETS[shape], seq_len=max(PRESETS[shape].seq_len, 1024))
            rng = np.random.default_rng(1234)
            weights = {name: (rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
                              if not name.startswith("rms") else np.ones(s, np.float32))
                       for name, s in checkpoint.tensor_shapes(config).items()}
            checkpoint.write(src, config, weights, version=1)
    files = {"fp32": src, "tokenizer": tok, "int8": directory / f"{shape}-q8.bin",
             "gguf-fp32": directory / f"{shape}-f32.gguf", "gguf-int8": directory / f"{shape}-q8_0.gguf"}
    ckpt = None
    for key, fmt, dtype in (("int8", "llama2c", None), ("gguf-fp32", "gguf", "fp32"),
                            ("gguf-int8", "gguf", "q8_0")):
        if files[key].exists() or (fmt == "gguf" and not gguf):
            continue
        ckpt = ckpt or checkpoint.load(src)
        source = CheckpointSource(ckpt)
        if fmt == "llama2c":
            export(files[key], source, fmt="llama2c", version=2, group_size=GROUP)
        else:
            try:
                export(files[key], source, fmt="gguf", dtype=dtype,
                       vocab=load_vocab(tok, ckpt.config.vocab_size), warn=lambda text: None)
            except FormatError:  # GGUF Q8_0 needs rows of whole 32-blocks (not stories260K's 172)
                files[key] = None
    return files


# -- the child process ------------------------------------------------------------------------------

def _prompt(n, vocab, seed=7):
    rng = np.random.default_rng(seed)
    return [1] + [int(t) for t in rng.integers(3, vocab, n - 1)]


def _measure(vocab, spawned, start, step, prefill):
    """The child's measurements, for any engine given as three functions: `start(prompt)` runs a
    prompt on a fresh context and returns the greedy token, `step(token)` feeds one token and returns
    the next greedy one, `prefill(prompt)` runs a prompt on a fresh context."""
    token = start(_prompt(SHORT_PROMPT, vocab))
    ttft = time.time() - spawned
    ids = [token]
    begin = time.perf_counter()
    token = step(token)  # the first decode step, timed apart
    ids.append(token)
    first_step = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        token = step(token)
        ids.append(token)
    decode = DECODE_TOKENS / (time.perf_counter() - begin)
    rates = {}
    for n in (128, 512):
        prompt = _prompt(n, vocab, seed=n)
        for _ in range(2):  # the second run is timed
            begin = time.perf_counter()
            prefill(prompt)
            took = time.perf_counter() - begin
        rates[n] = n / took
    return ttft, first_step, decode, rates, ids


def child_ours(path, threads, spawned):
    from ..threads import set_threads
    from ..loader import load_checkpoint
    from ..model import Transformer

    set_threads(threads)
    model = Transformer(load_checkpoint(path))
    cache = model.new_cache()

    def start(prompt):
        cache.reset()
        return int(np.argmax(model.forward(prompt, cache)[-1]))

    def step(token):
        return int(np.argmax(model.forward([token], cache)[-1]))

    return _measure(model.config.vocab_size, spawned, start, step, start)


def child_llama_cpp(path, threads, spawned, extra_bufts=True):
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    if not extra_bufts:
        # llama.cpp's AMX int8 path (an "extra buffer type") crashes with SIGSEGV on batches of more
        # than one token on machines whose kernel does not grant AMX tile state (seen in our VMs,
        # also with a Q8_0 file from llama.cpp's own quantizer); without extra buffer types it runs
        # its regular AVX-512/VNNI Q8_0 kernels.
        default_params = lc.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        lc.llama_model_default_params = params
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def last_logits():  # eval() keeps no scores without logits_all: read the context's last row
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def start(prompt):
        llm.reset()
        llm.eval(prompt)
        return int(np.argmax(last_logits()))

    def step(token):
        llm.eval([token])
        return int(np.argmax(last_logits()))

    return _measure(vocab, spawned, start, step, start)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). getrusage's ru_maxrss would not do: Linux keeps it
    across exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(argv):
    impl, path, threads, spawned = argv[0], argv[1], int(argv[2]), float(argv[3])
    if impl == "ours":
        ttft, first_step, decode, prefill, ids = child_ours(path, threads, spawned)
    else:
        ttft, first_step, decode, prefill, ids = child_llama_cpp(path, threads, spawned,
                                                                 extra_bufts=impl == "llama_cpp")
    rss_mb = peak_rss_mb()
    print(json.dumps({"ttft": ttft, "first_step": first_step, "decode": decode, "prefill128": prefill[128],
                      "prefill512": prefill[512], "rss": rss_mb, "ids": ids}))
    return 0


def run_child(impl, path, threads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(max(threads, 1)))
    cmd = [sys.executable, "-m", "llama2.benchmarks.engine", impl, str(path), str(threads), str(time.time())]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{impl} benchmark child failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the parent ---------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ..threads import available_cores

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": available_cores(), "memory_gib": round(mem, 1),
            "os": platform.platform(), "python": platform.python_version()}


def versions(peer: bool) -> dict:
    import numba

    from .. import __version__

    out = {"llama2": __version__, "numpy": np.__version__, "numba": numba.__version__}
    if peer:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    return out


def peer_available() -> str:
    """'' if llama-cpp-python can be imported, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a broken shared library
        return f"llama-cpp-python is not importable ({type(e).__name__}: {e}); pip install 'llama2[bench]'"
    return ""


def ratio(metric, ours, peer):
    if ours is None or peer is None or ours <= 0 or peer <= 0:
        return None
    return ours / peer if HIGHER_IS_BETTER[metric] else peer / ours


def run_bench(shapes, threads_list, weights_list, reps, with_peer, directory, assets, log):
    rows = []
    for shape in shapes:
        log(f"preparing {shape} ...")
        files = model_files(shape, directory, assets, gguf=with_peer)
        if with_peer:
            ours_ids = run_child("ours", files["fp32"], max(threads_list))["ids"][:CHECK_TOKENS]
            peer_ids = run_child("llama_cpp", files["gguf-fp32"], max(threads_list))["ids"][:CHECK_TOKENS]
            if ours_ids != peer_ids:
                raise RuntimeError(f"{shape}: llama.cpp's greedy ids differ from ours on the F32 GGUF "
                                   f"({peer_ids} vs {ours_ids}): not the same computation, not timing it")
            log(f"{shape}: llama.cpp's greedy ids on the F32 GGUF equal ours ({CHECK_TOKENS} tokens)")
        for weights in weights_list:
            for threads in threads_list:
                case = Case(shape, weights, threads)
                ours_path = files["fp32" if weights == "fp32" else "int8"]
                peer_path = files["gguf-fp32" if weights == "fp32" else "gguf-int8"]
                peer_here = with_peer and peer_path is not None
                peer_impl = "llama_cpp" if weights == "fp32" else "llama_cpp_no_extra_bufts"
                run_child("ours", ours_path, threads)  # warm-up (compiled-kernel cache, page cache)
                if peer_here:
                    run_child(peer_impl, peer_path, threads)
                samples = {"ours": [], "peer": []}
                for _ in range(reps):  # interleaved
                    samples["ours"].append(run_child("ours", ours_path, threads))
                    if peer_here:
                        samples["peer"].append(run_child(peer_impl, peer_path, threads))
                for metric in METRICS:
                    ours = statistics.median(s[metric] for s in samples["ours"])
                    peer = statistics.median(s[metric] for s in samples["peer"]) if peer_here else None
                    rows.append({"model": shape, "metric": metric, "weights": weights, "threads": threads,
                                 "ours": round(ours, 4), "peer": None if peer is None else round(peer, 4),
                                 "ratio": None if peer is None else round(ratio(metric, ours, peer), 3)})
                first = [statistics.median(s["first_step"] for s in samples[who])
                         for who in ("ours", "peer") if samples[who]]
                log(_row_line(rows[-len(METRICS):]) + ", first decode step "
                    + " vs ".join(f"{t:.3g}" for t in first) + " s")
    return rows


def _row_line(rows):
    r = rows[0]
    parts = [f"{x['metric']} {x['ours']:.4g}" + (f" vs {x['peer']:.4g} ({x['ratio']:.2f}x)" if x["peer"]
                                                  else "") for x in rows]
    return f"{r['model']} {r['weights']} t{r['threads']}: " + ", ".join(parts)


def table(rows) -> str:
    head = "| model | weights | threads | metric | ours | llama.cpp | ratio (>1: ours better) |\n" \
           "|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        unit = UNITS[r["metric"]]
        peer = "-" if r["peer"] is None else f"{r['peer']:.4g} {unit}"
        ratio_text = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['model']} | {r['weights']} | {r['threads']} | {r['metric']} | "
                     f"{r['ours']:.4g} {unit} | {peer} | {ratio_text} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
