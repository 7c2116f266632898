"""The format registries (llama2.formats.READERS and WRITERS): every writer's file is read back by
the reader `model_kind` picks for it, and each reader's `describe` (headers alone, for memory.py)
gives the types its loader holds."""

import json

import numpy as np
import pytest

from conftest import random_weights
from llama2 import formats, memory
from llama2.checkpoint import LAYER_MATRICES, STACKED
from llama2.config import ModelConfig
from llama2.export import export
from llama2.weights.bf16 import bf16_to_f32, f32_to_bf16
from test_export_errors import write_safetensors

# rows of 256 values, so every GGUF type (K-quants' 256-value super-blocks included) can store it
CONFIG = ModelConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                     seq_len=16, shared_classifier=False)


class RandomSource:
    """A random model as an export source (export.py's interface)."""

    def __init__(self, config):
        self.config, self.vocab, self.chat_template = config, None, None
        self.tensors = random_weights(config, seed=7, scale=0.05)

    def tensor(self, name, layer=None):
        return self.tensors[name] if layer is None else self.tensors[name][layer]


def held_kinds(ckpt) -> dict:
    """What the loader holds for each matrix: a weights type's name per layer (per tensor for the
    others), int8 of llama2.c's layout as "int8_groups:GROUP", as weights.stored_type names them."""
    def kind(m):
        if isinstance(m, np.ndarray):
            return "f32"
        return f"int8_groups:{m.group_size}" if m.NAME == "int8_groups" else m.NAME

    out = {}
    for name, value in ckpt.weights.items():
        if name.startswith("rms"):
            continue
        out[name] = [kind(m) for m in value] if name in LAYER_MATRICES else kind(value)
    return out


def described_kinds(path) -> dict:
    """formats.describe's answer with one kind per layer for every layer matrix."""
    config, stored = formats.describe(path)
    return {name: (kind if isinstance(kind, list) else [kind] * config.n_layers)
            if name in LAYER_MATRICES else kind for name, kind in stored.items()}


WRITTEN = [("llama2c", 0, "fp32"), ("llama2c", 1, "fp32"), ("llama2c", 2, "q8_0")]
WRITTEN += [("llama2c", 3, dtype) for dtype in formats.writer("llama2c").WRITE_DTYPES]
WRITTEN += [("gguf", 3, dtype) for dtype in formats.writer("gguf").WRITE_DTYPES]
WRITTEN += [("hf", 3, dtype) for dtype in formats.writer("hf").WRITE_DTYPES]


def test_every_writer_and_dtype_is_covered():
    assert {fmt for fmt, _, _ in WRITTEN} == set(formats.WRITERS)
    assert set(formats.WRITERS) <= set(formats.READERS)


@pytest.mark.parametrize("fmt, version, dtype", WRITTEN)
def test_writer_round_trips_through_its_reader(tmp_path, fmt, version, dtype):
    source = RandomSource(CONFIG)
    out = tmp_path / "model.out"
    warnings = []
    export(out, source, fmt, version, dtype, warn=warnings.append)
    assert formats.model_kind(out) == fmt
    assert [p.name for p in tmp_path.iterdir()] == ["model.out"]  # written to a temporary, renamed
    assert len(warnings) == (fmt != "llama2c")  # no vocabulary: only GGUF and HF folders say so
    ckpt = formats.load_checkpoint(out)
    c = ckpt.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == (
        256, 512, 2, 4, 2, 256, 16)
    assert described_kinds(out) == held_kinds(ckpt)  # the headers say what the loader holds
    exact = {"fp32": lambda a: a, "fp16": lambda a: a.astype(np.float16).astype(np.float32),
             "bf16": lambda a: bf16_to_f32(f32_to_bf16(a))}
    if dtype in exact:  # float types hold exactly the values rounded to them
        # as an export source: our q/k layout whatever the file's (an HF folder keeps HF's halves order)
        back = formats.open_source(out)
        for name, want in source.tensors.items():
            got = (np.stack([back.tensor(name, l) for l in range(c.n_layers)]) if name in STACKED
                   else back.tensor(name))
            assert np.array_equal(got, exact[dtype](want) if not name.startswith("rms") else want), name


def test_gguf_mix_is_described_per_tensor(tmp_path):
    out = tmp_path / "mix.gguf"
    export(out, RandomSource(CONFIG), "gguf", dtype="q4_k_m", warn=lambda text: None)
    kinds = described_kinds(out)
    assert kinds == held_kinds(formats.load_checkpoint(out))
    assert kinds["wcls"] == "q6_k" and "q4_k" in kinds["wq"]  # a mix: llama.cpp's rule per tensor
    assert memory.describe(out) == formats.describe(out)


def test_hf_folder_is_described_per_tensor(tmp_path):
    """A folder mixing F32, F16 and BF16 tensors: describe reads each from the safetensors header."""
    from llama2.formats import hf

    c = CONFIG
    source = RandomSource(c)
    stored = {"wq": "BF16", "wk": "F16", "w2": "F32", "token_embedding": "F16", "wcls": "BF16"}
    tensors, dtypes = {}, {}
    for name, arr in source.tensors.items():
        kind = "F32" if name.startswith("rms") else stored.get(name, "BF16")
        for layer in range(c.n_layers) if name in (*LAYER_MATRICES, "rms_att", "rms_ffn") else [None]:
            a = arr if layer is None else arr[layer]
            hf_name = hf.NAMES[name].format(layer)
            tensors[hf_name] = {"F32": a, "F16": a.astype(np.float16), "BF16": f32_to_bf16(a)}[kind]
            dtypes[hf_name] = kind
    folder = tmp_path / "hf"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", tensors, dtypes)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.seq_len, "tie_word_embeddings": False}))
    assert formats.model_kind(folder) == "hf"
    kinds = described_kinds(folder)
    assert kinds == held_kinds(formats.load_checkpoint(folder))
    assert kinds["wq"] == ["bf16"] * c.n_layers and kinds["wk"] == ["f16"] * c.n_layers
    assert kinds["w2"] == ["f32"] * c.n_layers and kinds["token_embedding"] == "f16"
