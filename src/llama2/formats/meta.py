"""Meta's Llama checkpoints (params.json + consolidated.NN.pth) and llama2.c training checkpoints
(ckpt.pt: {"model_args", "model"}) as tensor sources. Needs torch, imported here only.

Model-parallel shards split each matrix along one axis (fairscale's ColumnParallelLinear splits the
output rows, RowParallelLinear and ParallelEmbedding the input columns); norms are replicated. Meta's
q/k layout is already the interleaved one llama2.c uses. Reference: facebookresearch/llama model.py.
"""

import json
import os
from pathlib import Path

import numpy as np

from ..checkpoint import tensor_shapes
from ..config import ModelConfig
from ..errors import FormatError
from ..fileio import open_user_file, read_user_text
from .vocab import load_vocab

# our name -> (Meta name, axis the model-parallel shards are concatenated along; None: replicated)
NAMES = {
    "token_embedding": ("tok_embeddings.weight", 1),
    "rms_att": ("layers.{}.attention_norm.weight", None),
    "wq": ("layers.{}.attention.wq.weight", 0),
    "wk": ("layers.{}.attention.wk.weight", 0),
    "wv": ("layers.{}.attention.wv.weight", 0),
    "wo": ("layers.{}.attention.wo.weight", 1),
    "rms_ffn": ("layers.{}.ffn_norm.weight", None),
    "w1": ("layers.{}.feed_forward.w1.weight", 0),
    "w2": ("layers.{}.feed_forward.w2.weight", 1),
    "w3": ("layers.{}.feed_forward.w3.weight", 0),
    "rms_final": ("norm.weight", None),
    "wcls": ("output.weight", 0),
}


def _torch():
    try:
        import torch
    except ImportError:
        raise FormatError("reading PyTorch checkpoints needs torch (pip install torch)") from None
    return torch


def _load(path):
    torch = _torch()
    os.close(open_user_file(path, "PyTorch checkpoint"))  # torch maps it by name: check it first
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as e:  # torch raises many types for a bad file
        raise FormatError(f"{path}: cannot read PyTorch checkpoint ({str(e).splitlines()[0]})") from None


class MetaModel:
    """Meta-layout state dicts (one per model-parallel shard) as a tensor source."""

    def __init__(self, shards, params: dict, source: str, seq_len=None):
        self.shards, self.source = shards, source
        self.vocab, self.chat_template = None, None
        first = shards[0]
        for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
            if key not in first:
                raise FormatError(f"{source}: tensor {key} not found (not a Llama checkpoint?)")
        try:
            dim, heads = int(params["dim"]), int(params["n_heads"])
            vocab = sum(s["tok_embeddings.weight"].shape[0] for s in shards[:1])
            hidden = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards)
            seq_len = seq_len or params.get("max_seq_len") or params.get("max_position_embeddings")
            if not seq_len:
                raise FormatError(f"{source}: params.json gives no max_seq_len; pass --seq-len "
                                  "(Llama 2: 4096, Code Llama: 16384)")
            shared = "output.weight" not in first
            self.config = ModelConfig(
                dim=dim, hidden_dim=hidden, n_layers=int(params["n_layers"]), n_heads=heads,
                n_kv_heads=int(params.get("n_kv_heads") or heads), vocab_size=int(vocab),
                seq_len=int(seq_len), shared_classifier=shared,
                rope_theta=float(params.get("rope_theta") or 10000.0),
                norm_eps=float(params.get("norm_eps", 1e-5)))
        except KeyError as e:
            raise FormatError(f"{source}: params lack field {e.args[0]}") from None
        self.config.validate(source)
        if int(params.get("vocab_size", -1)) not in (-1, vocab):
            raise FormatError(f"{source}: params.json vocab_size {params['vocab_size']} but "
                              f"tok_embeddings has {vocab} rows")

    def tensor(self, name, layer=None) -> np.ndarray:
        torch = _torch()
        key, axis = NAMES[name]
        key = key.format(layer)
        parts = []
        for i, shard in enumerate(self.shards if axis is not None else self.shards[:1]):
            if key not in shard:
                raise FormatError(f"{self.source}: tensor {key} not found in shard {i}")
            parts.append(shard[key])
        try:
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)
        except RuntimeError:
            shapes = ", ".join(str(list(p.shape)) for p in parts)
            raise FormatError(f"{self.source}: shards of {key} do not fit together ({shapes})") from None
        shape = tensor_shapes(self.config)[name]
        want = shape[1:] if layer is not None else shape
        if tuple(t.shape) != tuple(want):
            raise FormatError(f"{self.source}: tensor {key} has shape {list(t.shape)}, "
                              f"params imply {list(want)}")
        return t.float().numpy()


def open_meta(directory, seq_len=None) -> MetaModel:
    """A Meta Llama directory: params.json and consolidated.00.pth ... consolidated.NN.pth, and the
    vocabulary of a tokenizer.model in it or beside it."""
    directory = Path(directory)
    params_path = directory / "params.json"
    if not params_path.is_file():
        raise FormatError(f"{directory}: no params.json (expected a Meta Llama checkpoint directory)")
    try:
        params = json.loads(read_user_text(params_path, "params.json"))
    except ValueError as e:
        raise FormatError(f"{params_path}: not valid JSON ({e})") from None
    paths = sorted(directory.glob("consolidated.*.pth"))
    if not paths:
        raise FormatError(f"{directory}: no consolidated.NN.pth shards")
    for i, path in enumerate(paths):  # shards are numbered 00, 01, ... without gaps
        if path.name != f"consolidated.{i:02d}.pth":
            raise FormatError(f"{directory / f'consolidated.{i:02d}.pth'}: shard missing "
                              f"(found {', '.join(p.name for p in paths)})")
    model = MetaModel([_load(p) for p in paths], params, str(directory), seq_len)
    # Meta's downloads keep tokenizer.model beside the model folders, or inside one
    for candidate in (directory / "tokenizer.model", directory.parent / "tokenizer.model"):
        if candidate.is_file():
            model.vocab = load_vocab(candidate)  # sentencepiece (Llama 2) or tiktoken (Llama 3)
            break
    return model


def open_train_checkpoint(path, seq_len=None) -> MetaModel:
    """A llama2.c training checkpoint: {"model_args": {...}, "model": state_dict}. The classifier
    counts as shared when it equals the token embedding (as llama2.c's export.py decides)."""
    torch = _torch()
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise FormatError(f"{path}: not a llama2.c training checkpoint (expects 'model' and "
                          "'model_args')")
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    if "output.weight" in state and torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        del state["output.weight"]
    return MetaModel([state], dict(ckpt["model_args"]), str(path), seq_len)

