"""Shared test fixtures: where the shared assets are, small random models made on the spot, and
stories260K loaded once per test module."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llama2 import checkpoint, native
from llama2.config import ModelConfig
from llama2.formats import llama2c
from llama2.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("LLAMA2_ASSETS", REPO.parent / "shared" / "assets"))
GOLDEN = Path(os.environ.get("LLAMA2_GOLDEN", ASSETS.parent / "golden"))


def asset(name) -> Path:
    """Path of a shared asset, or skip the test saying what is missing."""
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"shared asset {name} not found in {ASSETS} (set LLAMA2_ASSETS)")
    return path


def golden(name) -> Path:
    path = GOLDEN / name
    if not path.exists():
        pytest.skip(f"golden file {name} not found in {GOLDEN} (set LLAMA2_GOLDEN)")
    return path


def golden_cases(name) -> list:
    """Every case of golden file `name` (one JSON object a line) as a pytest param, or one skipped
    param saying what is missing."""
    path = GOLDEN / name
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} not found (set LLAMA2_GOLDEN)"))]
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [pytest.param(c, id=f"{i}-{c.get('model', c['tokenizer'])}") for i, c in enumerate(lines)]


def random_weights(config: ModelConfig, seed=0, scale=0.1) -> dict:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in checkpoint.tensor_shapes(config).items():
        if name.startswith("rms"):
            weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return weights


def random_adapter(path, config: ModelConfig, rank=4, alpha=8.0, seed=0, scale=0.05) -> Path:
    """A LoRA adapter of random factors on every linear layer of a base of `config`, written by our
    writer in both forms (PEFT's files and adapter.gguf) into folder `path`."""
    from llama2.formats import adapter
    rng = np.random.default_rng(seed)
    shapes = checkpoint.tensor_shapes(config)
    factors = {(name, l): ((scale * rng.standard_normal((rank, shapes[name][2]))).astype(np.float32),
                           (scale * rng.standard_normal((shapes[name][1], rank))).astype(np.float32))
               for l in range(config.n_layers) for name in checkpoint.LAYER_MATRICES}
    adapter.write(path, config, factors, rank, alpha)
    return Path(path)


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer like llama2.c's exports: <unk>, BOS, EOS, 256 byte pieces, then merges."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    scores = [0.0] * len(pieces)
    letters = b" abcdefghijklmnopqrstuvwxyz"
    k = 0
    while len(pieces) < vocab_size:
        a, b = letters[k % len(letters)], letters[(k // len(letters)) % len(letters)]
        piece = bytes([a]) if k < len(letters) else bytes([b, a])
        if piece not in pieces:
            pieces.append(piece)
            scores.append(-float(len(pieces)))
        k += 1
    return Tokenizer(pieces, scores)


TINY = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, seq_len=64)


@pytest.fixture
def tiny_model(tmp_path):
    """A random-weight v1 checkpoint and a matching tokenizer in a temp folder."""
    ckpt = tmp_path / "tiny.bin"
    llama2c.write(ckpt, TINY, random_weights(TINY), version=1)
    tok = tmp_path / "tok.bin"
    byte_tokenizer(TINY.vocab_size).save(tok)
    return ckpt, tok


@pytest.fixture(scope="module")
def llama():
    """stories260K with its tokenizer (the shared assets), loaded once per test module."""
    from llama2 import Llama
    return Llama.load(asset("stories260K.bin"), asset("tok512.bin"))


@pytest.fixture
def restore_level():
    """Puts back the kernels' instruction-set levels (per weight type) and thread count a test changed."""
    before, threads = native.kernels(), native._native.threads()
    yield
    native.select_kernels(before)
    native.set_threads(threads)


def mixed_kernels():
    """A per-type choice (native.select_kernels) with each weight type on another of the variants this
    CPU runs, round robin over the types in id order, and the quantized types' decode rows on yet
    another SIMD variant where there is one: neighbouring types (Q4_K beside Q6_K in a q4_k_m file)
    run on different levels in one pass, as llama2.kernel_choice's table may arrange."""
    have = native.variants()
    simd = [v for v in have if v != "scalar"]
    names = [native.TYPES[t][0] for t in sorted(native.TYPES)]
    types = {name: have[(i + 1) % len(have)] for i, name in enumerate(names)}
    decode = {name: simd[(simd.index(v) + 1) % len(simd)]
              if v in simd and native.WEIGHT_TYPES[name.lower()].activations else v for name, v in types.items()}
    return native.Kernels(have[0], types, decode)
