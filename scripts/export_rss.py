"""Measure the peak memory (RSS) of `llama2 export --hf` on a 110M-shaped model versus its size.

    python scripts/export_rss.py [--dtype F32|BF16] [--dir /tmp/hf110m]

Writes a random-weight Hugging Face directory shaped like stories110M (dim 768, 12 layers, 12 heads,
hidden 2048, vocab 32000) once, then runs the export in a child process and reports the child's
peak RSS (VmHWM). A measurement script, not a test.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(dim=768, hidden=2048, layers=12, heads=12, vocab=32000, seq_len=1024)


def tensor_shapes():
    D, H, V = SHAPE["dim"], SHAPE["hidden"], SHAPE["vocab"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (D, D),
                   p + "self_attn.v_proj.weight": (D, D), p + "self_attn.o_proj.weight": (D, D),
                   p + "mlp.gate_proj.weight": (H, D), p + "mlp.up_proj.weight": (H, D),
                   p + "mlp.down_proj.weight": (D, H)}
    return shapes


def make_model(directory: Path, dtype: str):
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": SHAPE["dim"], "intermediate_size": SHAPE["hidden"],
              "num_hidden_layers": SHAPE["layers"], "num_attention_heads": SHAPE["heads"],
              "num_key_value_heads": SHAPE["heads"], "vocab_size": SHAPE["vocab"],
              "max_position_embeddings": SHAPE["seq_len"], "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    itemsize = 4 if dtype == "F32" else 2
    header, offset = {}, 0
    shapes = tensor_shapes()
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    rng = np.random.default_rng(0)
    with open(directory / "model.safetensors", "wb") as f:  # one tensor at a time
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape in shapes.items():
            w = (0.02 * rng.standard_normal(shape, dtype=np.float32))
            f.write(w.tobytes() if dtype == "F32" else (w.view(np.uint32) >> 16).astype("<u2").tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("F32", "BF16"), default="F32")
    ap.add_argument("--dir", default="/tmp/hf110m")
    ap.add_argument("--args", default="", help="extra export flags, e.g. '--version 2'")
    args = ap.parse_args()
    directory = Path(args.dir) / args.dtype
    if not (directory / "model.safetensors").exists():
        make_model(directory, args.dtype)
        print(f"wrote {directory}; run again to measure (a fresh process, not this one)")
        return
    out = directory.parent / f"out-{args.dtype}.bin"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    # VmHWM (peak resident set) is per process image, so the child reports its own
    probe = ("import sys, llama2.cli as c; {run}"
             "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    argv = ["export", str(out), "--hf", str(directory), *args.args.split()]
    start = time.perf_counter()
    peak = subprocess.run([sys.executable, "-c", probe.format(run=f"c.main({argv!r});")], env=env,
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    base = subprocess.run([sys.executable, "-c", probe.format(run="import llama2.export, llama2.formats.hf;")],
                          env=env, capture_output=True, text=True, check=True)
    size = (directory / "model.safetensors").stat().st_size / 2**20
    print(f"input {size:.0f} MiB ({args.dtype}), output {out.stat().st_size / 2**20:.0f} MiB, "
          f"export peak RSS {int(peak.stdout) / 1024:.0f} MiB (after imports alone: "
          f"{int(base.stdout) / 1024:.0f} MiB), {seconds:.1f} s")
    out.unlink()


if __name__ == "__main__":
    main()
