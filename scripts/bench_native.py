"""Micro-benchmark of the native kernels: decode GB/s and prompt GFLOP/s per weight type and level,
and which level would run each type fastest on this CPU.

    python scripts/bench_native.py [--threads 2] [--types Q4_K,Q6_K,...] [--levels avx2,avx512vnni]
                                   [--rows 11008] [--cols 4096] [--n 1,64] [--seconds 0.3] [--reps 5]
                                   [--stat median|min]

For each type and compiled variant (forced in-process with native.select_variant; a level name
that is not a variant's, e.g. "avx512" on a build without that variant, goes through native.select), times
native.matmul on random weights [rows, cols] (default: Llama-2-7B's up projection, far larger than
the caches) for each activation count N: N = 1..8 is decode (reported as weight GB/s streamed),
larger N is a prompt (reported as GFLOP/s, 2 * rows * cols * N per call). The levels are measured
interleaved, --reps times, and each cell is the median of the rounds (a machine that gets busier
halfway through slows every level alike) or, with --stat min, the fastest call of all. A
measurement script, not a test: run it on an idle machine.

The last table is the choice: for each type, every level's speed relative to the fastest level
at the first N (decode) and at the largest N (prompt), the level with the best geometric mean of
the two (a float type's decode and prompt kernels run at one level: kernels.h's batch-invariance
contract), the best for each alone (a quantized type's decode may run at its own level: its SIMD
kernels agree bit for bit), and the levels llama2.kernel_choice's table picks for this CPU. A
choice worth changing goes into that table (docs/engine.md).
"""

import argparse
import time

import numpy as np

from llama2 import native
from llama2.threads import set_threads

NAMES = {name: t for t, (name, _, _) in native.TYPES.items()}


def random_weights(rng, t, rows, cols):
    name, values, nbytes = native.TYPES[t]
    if name in ("F32", "F16", "BF16"):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if name == "F16":
            return w.astype(np.float16).view(np.uint8)
        if name == "BF16":
            return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return w.view(np.uint8)
    w = rng.integers(0, 256, size=(rows, cols // values * nbytes), dtype=np.uint8)
    # Finite, small scales: every fp16 field of these layouts -> 0x1400 (about 0.001).
    blocks = w.reshape(rows, -1, nbytes)
    scale_offsets = {"Q6_K": [208]}.get(name, [0, 2] if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for off in scale_offsets:
        blocks[..., off] = 0x00
        blocks[..., off + 1] = 0x14
    return w


def time_calls(f, seconds):
    """Seconds of each call of f for about `seconds`, after a warm-up call."""
    f()  # warm-up: pool started, scratch grown, weights touched
    calls, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        begin = time.perf_counter()
        f()
        calls.append(time.perf_counter() - begin)
    return calls


def cell(n, rows, cols, nbytes, dt):
    return f"{nbytes / dt / 1e9:6.1f} GB/s" if n <= 8 else f"{2 * rows * cols * n / dt / 1e9:6.1f} GF/s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="F32,F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K")
    # every SIMD variant this CPU runs (scalar is far behind; name it to include it)
    ap.add_argument("--levels", default=",".join(v for v in native.variants() if v != "scalar"))
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--n", default="1,64", help="activation rows per call; the first is decode, the last the prompt")
    ap.add_argument("--seconds", type=float, default=0.3, help="per measurement")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds, median kept")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="median: of the rounds' mean call times; min: the fastest call of all rounds (on a "
                         "busy machine, a call that ran without being preempted: closer to the idle speed)")
    a = ap.parse_args()
    set_threads(a.threads)
    rng = np.random.default_rng(0)
    ns = [int(v) for v in a.n.split(",")]
    types, levels = a.types.split(","), a.levels.split(",")
    cpu = native.cpu()
    print(f"cpu {cpu.vendor} family {cpu.family:#x} model {cpu.model:#x}, threads {a.threads}, "
          f"w [{a.rows}, {a.cols}], variants {', '.join(native.variants())}, {a.stat} of {a.reps} rounds", flush=True)
    weights = {name: random_weights(rng, NAMES[name], a.rows, a.cols) for name in types}
    xs = {n: rng.standard_normal((n, a.cols)).astype(np.float32) for n in ns}
    times = {}  # (type, level, n) -> [seconds per call]
    before = native.kernels()
    try:
        for _ in range(a.reps):
            for name in types:
                for level in levels:
                    # a level (scalar, avx2, avx512) or a compiled variant (avx512vnni, ...)
                    native.select_variant(level) if level in native.variants() else native.select(level)
                    for n in ns:
                        out = np.empty((n, a.rows), np.float32)
                        f = lambda: native.matmul(NAMES[name], weights[name], xs[n], out)  # noqa: E731
                        times.setdefault((name, level, n), []).append(time_calls(f, a.seconds))
    finally:
        native.select_kernels(before)
    med = {k: float(min(min(r) for r in v) if a.stat == "min" else np.median([np.mean(r) for r in v]))
           for k, v in times.items()}
    print(f"{'type':6} {'level':10} " + " ".join(f"{'N=' + str(n):>12}" for n in ns))
    for name in types:
        for level in levels:
            print(f"{name:6} {level:10} " + " ".join(
                f"{cell(n, a.rows, a.cols, weights[name].nbytes, med[name, level, n]):>12}" for n in ns))
    chosen = native.choose(cpu)
    d, p = ns[0], ns[-1]
    print(f"\nspeed / the type's fastest level (decode N={d}, prompt N={p}); best: of the geometric mean of the "
          "two, and of each alone; table: the level the table gives each type (decode / prompts)")
    print(f"{'type':6} " + " ".join(f"{lv:>14}" for lv in levels) + f" {'best':>10} {'decode':>10} {'prompt':>10}"
          + f" {'table':>22}")
    for name in types:
        rel = {lv: (min(med[name, v, d] for v in levels) / med[name, lv, d],
                    min(med[name, v, p] for v in levels) / med[name, lv, p]) for lv in levels}
        best = max(levels, key=lambda lv: rel[lv][0] * rel[lv][1])
        print(f"{name:6} " + " ".join(f"{rel[lv][0]:6.2f} {rel[lv][1]:6.2f} " for lv in levels)
              + f"{best:>10} {max(levels, key=lambda lv: rel[lv][0]):>10} {max(levels, key=lambda lv: rel[lv][1]):>10}"
              + f" {chosen.decode[name] + ' / ' + chosen.types[name]:>22}")

if __name__ == "__main__":
    main()
