"""Meta-format checkpoints (one shard and two model-parallel shards) and llama2.c training checkpoints,
exported and checked against a small torch reference of Meta's Llama model written here."""

import io
import json

import numpy as np
import pytest

from conftest import asset, byte_tokenizer
from llama2 import Llama
from llama2.tokenizer import Tokenizer
from llama2.cli import main

torch = pytest.importorskip("torch", reason="Meta checkpoints are PyTorch files")

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 320,
          "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 1e6,
          "max_seq_len": 64}
HIDDEN = 192  # multiple_of * ceil(2 * 4 * 64 / 3 / multiple_of)
# Meta name -> axis fairscale splits it along across model-parallel ranks (None: replicated)
SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0,
         "output": 0, "attention_norm": None, "ffn_norm": None, "norm": None}


def meta_state_dict(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    D, H, V = p["dim"], HIDDEN, p["vocab_size"]
    kv = D // p["n_heads"] * p["n_kv_heads"]

    def rnd(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=g)

    sd = {"tok_embeddings.weight": rnd(V, D), "norm.weight": 1 + rnd(D), "output.weight": rnd(V, D)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        sd |= {pre + "attention.wq.weight": rnd(D, D), pre + "attention.wk.weight": rnd(kv, D),
               pre + "attention.wv.weight": rnd(kv, D), pre + "attention.wo.weight": rnd(D, D),
               pre + "feed_forward.w1.weight": rnd(H, D), pre + "feed_forward.w2.weight": rnd(D, H),
               pre + "feed_forward.w3.weight": rnd(H, D),
               pre + "attention_norm.weight": 1 + rnd(D), pre + "ffn_norm.weight": 1 + rnd(D)}
    return sd


def reference_logits(sd, p, ids):
    """Meta's Llama forward (llama/model.py), written out: complex-number RoPE over adjacent pairs,
    grouped-query attention by repeating k/v heads, SwiGLU, RMSNorm."""
    D, nh, nkv = p["dim"], p["n_heads"], p["n_kv_heads"]
    hd, T, eps = D // nh, len(ids), p["norm_eps"]
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # [T, heads, hd]
        xc = torch.view_as_complex(x.reshape(T, -1, hd // 2, 2))
        return torch.view_as_real(xc * cis[:, None]).reshape(T, -1, hd)

    mask = torch.full((T, T), float("-inf")).triu(1)
    x = sd["tok_embeddings.weight"][torch.tensor(ids)]
    for i in range(p["n_layers"]):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        h = norm(x, w["attention_norm.weight"])
        q = rope((h @ w["attention.wq.weight"].T).view(T, nh, hd))
        k = rope((h @ w["attention.wk.weight"].T).view(T, nkv, hd))
        v = (h @ w["attention.wv.weight"].T).view(T, nkv, hd)
        k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
        scores = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5 + mask
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, D)
        x = x + out @ w["attention.wo.weight"].T
        h = norm(x, w["ffn_norm.weight"])
        ff = torch.nn.functional.silu(h @ w["feed_forward.w1.weight"].T) * (h @ w["feed_forward.w3.weight"].T)
        x = x + ff @ w["feed_forward.w2.weight"].T
    return (norm(x, sd["norm.weight"]) @ sd["output.weight"].T).numpy()


def split(sd, n):
    """Split a state dict into n model-parallel shards the way fairscale lays them out."""
    shards = [{} for _ in range(n)]
    for key, value in sd.items():
        axis = SPLIT[key.split(".")[-2]]
        parts = [value] * n if axis is None else value.chunk(n, dim=axis)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for shard in shards:
        shard["rope.freqs"] = torch.zeros(8)  # present in Meta's files, unused
    return shards


def write_meta(directory, sd, params, n_shards):
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(split(sd, n_shards)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    return main(argv, stdout=out, stderr=err, stdin=io.StringIO("")), err.getvalue()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_matches_reference(tmp_path, n_shards):
    sd = meta_state_dict(PARAMS)
    write_meta(tmp_path / "meta", sd, PARAMS, n_shards)
    out = tmp_path / "meta.bin"
    code, err = run_cli(["export", str(out), "--meta-llama", str(tmp_path / "meta")])
    assert code == 0, err
    llama = Llama.load(out, tokenizer=byte_tokenizer(PARAMS["vocab_size"]))
    c = llama.config
    assert (c.hidden_dim, c.seq_len, c.rope_theta, c.n_kv_heads) == (HIDDEN, 64, 1e6, 2)
    ids = np.random.default_rng(0).integers(0, PARAMS["vocab_size"], 32).tolist()
    np.testing.assert_allclose(llama.logits(ids), reference_logits(sd, PARAMS, ids), atol=1e-4, rtol=0)


def test_meta_tokenizer_beside_the_checkpoint_goes_into_gguf(tmp_path):
    params = PARAMS | {"vocab_size": 512}
    write_meta(tmp_path / "meta", meta_state_dict(params), params, 2)
    (tmp_path / "tokenizer.model").write_bytes(asset("tok512.model").read_bytes())
    out = tmp_path / "meta.gguf"
    code, err = run_cli(["export", str(out), "--meta-llama", str(tmp_path / "meta"), "--format", "gguf"])
    assert code == 0 and "warning" not in err, err
    llama = Llama.load(out)  # the vocabulary travels in the GGUF
    assert llama.tokenizer.pieces == Tokenizer.load(asset("tok512.bin")).pieces


def test_meta_without_max_seq_len_needs_seq_len(tmp_path):
    params = {k: v for k, v in PARAMS.items() if k != "max_seq_len"}
    write_meta(tmp_path / "meta", meta_state_dict(params), params, 1)
    out = tmp_path / "meta.bin"
    code, err = run_cli(["export", str(out), "--meta-llama", str(tmp_path / "meta")])
    assert code == 1 and "--seq-len" in err and err.count("\n") == 1 and not out.exists()
    assert run_cli(["export", str(out), "--meta-llama", str(tmp_path / "meta"), "--seq-len", "48"])[0] == 0
    assert Llama.load(out, tokenizer=byte_tokenizer(320)).config.seq_len == 48


def test_llama2c_training_checkpoint(tmp_path):
    """train.py's ckpt.pt: model_args plus a state dict whose classifier is the embedding."""
    sd = meta_state_dict(PARAMS, seed=3)
    sd["output.weight"] = sd["tok_embeddings.weight"]
    args = {k: PARAMS[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                   "multiple_of", "max_seq_len")} | {"dropout": 0.0}
    torch.save({"model_args": args, "model": {"_orig_mod." + k: v for k, v in sd.items()},
                "iter_num": 10}, tmp_path / "ckpt.pt")
    out = tmp_path / "trained.bin"
    assert run_cli(["export", str(out), "--checkpoint", str(tmp_path / "ckpt.pt"), "--version", "0"])[0] == 0
    llama = Llama.load(out, tokenizer=byte_tokenizer(PARAMS["vocab_size"]))
    assert llama.config.shared_classifier
    ids = list(range(5, 37))
    params = PARAMS | {"rope_theta": 10000.0}  # llama2.c's model_args have no rope_theta
    np.testing.assert_allclose(llama.logits(ids), reference_logits(sd, params, ids), atol=1e-4, rtol=0)
