"""Micro-benchmark of the native kernels: decode GB/s and prompt GFLOP/s per weight type and level.

    python scripts/bench_native.py [--threads 2] [--types Q4_K,Q6_K,...] [--levels scalar,avx2,avx512,avx512vnni]
                                   [--rows 11008] [--cols 4096] [--n 1,4,128,512] [--seconds 1]

For each type and compiled variant (forced in-process with native.select_variant; a level name
that is not a variant's, e.g. "avx512" on a build without that variant, goes through native.select), times
native.matmul on random weights [rows, cols] (default: Llama-2-7B's up projection, far larger than
the caches) for each activation count N: N = 1..8 is decode (reported as weight GB/s streamed),
larger N is a prompt (reported as GFLOP/s, 2 * rows * cols * N per call). A measurement script,
not a test: run it on an idle machine.
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


def time_call(f, seconds):
    f()  # warm-up: pool started, scratch grown, weights touched
    n, t0 = 0, time.perf_counter()
    while True:
        f()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="F32,F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--levels", default=",".join(native.variants()))  # every variant this CPU runs
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--n", default="1,4,128,512")
    ap.add_argument("--seconds", type=float, default=1.0)
    a = ap.parse_args()
    set_threads(a.threads)
    rng = np.random.default_rng(0)
    ns = [int(v) for v in a.n.split(",")]
    print(f"threads {a.threads}, w [{a.rows}, {a.cols}], variants {', '.join(native.variants())}")
    print(f"{'type':6} {'level':7} " + " ".join(f"{'N=' + str(n):>14}" for n in ns))
    for name in a.types.split(","):
        t = NAMES[name]
        w = random_weights(rng, t, a.rows, a.cols)
        for level in a.levels.split(","):
            # a level (scalar, avx2, avx512) or a compiled variant (avx512vnni, ...)
            native.select_variant(level) if level in native.variants() else native.select(level)
            cells = []
            for n in ns:
                x = rng.standard_normal((n, a.cols)).astype(np.float32)
                out = np.empty((n, a.rows), np.float32)
                dt = time_call(lambda: native.matmul(t, w, x, out), a.seconds)
                cells.append(f"{w.nbytes / dt / 1e9:8.1f} GB/s" if n <= 8 else f"{2 * a.rows * a.cols * n / dt / 1e9:6.1f} GFLOP/s")
            print(f"{name:6} {level:7} " + " ".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
