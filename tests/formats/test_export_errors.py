"""Bad inputs to `llama2 export` and direct loading: one-line errors, no traceback, non-zero exit,
and never a half-written output file (writes go to a temp file renamed at the end)."""

import io
import json
import struct

import numpy as np
import pytest

from conftest import asset
from llama2.cli import main

HF_CONFIG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
             "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    return main(argv, stdout=out, stderr=err, stdin=io.StringIO("")), err.getvalue()


def write_safetensors(path, tensors, dtype="F32"):
    """A safetensors file written by hand: 8-byte header length, JSON header, raw data. `dtype`: every
    tensor's safetensors dtype, or a dict of them by name."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype[name] if isinstance(dtype, dict) else dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def hf_tensors(cfg, hidden=None):
    D, H, V, L = cfg["hidden_size"], hidden or cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = D // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
              p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
              p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
              p + "mlp.gate_proj.weight": (H, D), p + "mlp.up_proj.weight": (H, D),
              p + "mlp.down_proj.weight": (D, H)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def hf_dir(tmp_path, cfg=HF_CONFIG, tensors=None, dtype="F32"):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    write_safetensors(d / "model.safetensors", tensors if tensors is not None else hf_tensors(cfg), dtype)
    return d


def assert_one_line_failure(tmp_path, argv, *words):
    out = tmp_path / "out" / "model.bin"
    code, err = run_cli(["export", str(out), *argv])
    assert code != 0
    assert err.startswith("llama2: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    # nothing written, not even a temp file left behind
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    return err


def test_good_hand_written_directory_exports(tmp_path):
    """The fixture itself is valid, so each failure below is caused by its one defect."""
    out = tmp_path / "ok.bin"
    assert run_cli(["export", str(out), "--hf", str(hf_dir(tmp_path))])[0] == 0 and out.exists()


def test_directory_missing_config_json(tmp_path):
    d = hf_dir(tmp_path)
    (d / "config.json").unlink()
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "config.json")
    assert_one_line_failure(tmp_path, ["--from", str(d)], "config.json")


def test_missing_shard(tmp_path):
    d = hf_dir(tmp_path)
    tensors = hf_tensors(HF_CONFIG)
    names = sorted(tensors)
    (d / "model.safetensors").unlink()
    write_safetensors(d / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[:10]})
    weight_map = {n: "model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors"
                  for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "model-00002-of-00002.safetensors", "missing")


def test_missing_meta_shard(tmp_path):
    d = tmp_path / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4}))
    for i in (0, 2):
        (d / f"consolidated.{i:02d}.pth").write_bytes(b"")
    assert_one_line_failure(tmp_path, ["--meta-llama", str(d)], "consolidated.01.pth", "missing")


def test_mismatched_shapes(tmp_path):
    """config.json says intermediate_size 48, the tensors have 40: caught mid-stream, after the
    output file was begun, and still nothing is left behind."""
    d = hf_dir(tmp_path, tensors=hf_tensors(HF_CONFIG, hidden=40))
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "gate_proj", "[40, 32]", "[48, 32]")
    assert_one_line_failure(tmp_path, ["--hf", str(d), "--format", "gguf"], "gate_proj")


def test_unknown_dtype(tmp_path):
    cfg = HF_CONFIG
    tensors = {k: v.astype(np.int32) for k, v in hf_tensors(cfg).items()}
    d = hf_dir(tmp_path, tensors=tensors, dtype="I32")
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "I32")


def test_unknown_dtype_flag(tmp_path):
    out = tmp_path / "x.bin"
    code, err = run_cli(["export", str(out), "--from", str(asset("stories260K.bin")), "--dtype", "fp8"])
    assert code == 2 and err.count("\n") == 1 and "fp8" in err and not out.exists()


def test_unsupported_model_type_and_rope_scaling(tmp_path):
    d = hf_dir(tmp_path, cfg=HF_CONFIG | {"model_type": "gpt2"})
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "gpt2")
    (d / "config.json").write_text(json.dumps(HF_CONFIG | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "yarn")
    (d / "config.json").write_text(json.dumps(HF_CONFIG | {"rope_scaling": {"rope_type": "llama3"}}))
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "rope_scaling", "factor")
    # a scaling llama2.c's header cannot hold: GGUF can
    scaled = {"rope_type": "linear", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(HF_CONFIG | {"rope_scaling": scaled}))
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "rope_scaling=linear", "GGUF")


def test_not_a_model(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + struct.pack("<I", 99) + bytes(16))
    assert_one_line_failure(tmp_path, ["--from", str(junk)], "GGUF version 99")
    assert_one_line_failure(tmp_path, ["--from", str(tmp_path / "nothing.bin")], "no such file")


def test_version_0_cannot_hold_fp16(tmp_path):
    assert_one_line_failure(tmp_path, ["--from", str(asset("stories260K.bin")), "--version", "1",
                                       "--dtype", "fp16"], "--version 3")


def test_gguf_q8_needs_multiples_of_32(tmp_path):
    # stories260K's hidden_dim 172 cannot be cut into 32-value Q8_0 rows
    assert_one_line_failure(tmp_path, ["--from", str(asset("stories260K.bin")), "--format", "gguf",
                                       "--version", "2"], "multiples of 32")


@pytest.mark.parametrize("argv", [["--hf"], []])
def test_usage_errors(tmp_path, argv):
    code, err = run_cli(["export", str(tmp_path / "x.bin"), *argv])
    assert code == 2 and err.count("\n") == 1


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    d = hf_dir(tmp_path)
    tensors = hf_tensors(HF_CONFIG)
    weight_map = {n: "model.safetensors" for n in tensors}
    weight_map["model.layers.1.mlp.up_proj.weight"] = "model.safetensors"
    (d / "model.safetensors").unlink()
    write_safetensors(d / "model.safetensors",
                      {n: t for n, t in tensors.items() if n != "model.layers.1.mlp.up_proj.weight"})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_one_line_failure(tmp_path, ["--hf", str(d)], "up_proj")
