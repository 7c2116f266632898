"""Hugging Face models against transformers itself (litgpt's pattern): tiny random LlamaForCausalLM
configs saved with save_pretrained, loaded directly and exported, give the same logits."""

import copy
import dataclasses
import io
import json

import numpy as np
import pytest

from conftest import asset, byte_tokenizer
from llama2 import Llama, checkpoint
from llama2.cli import main
from llama2.formats import llama2c

torch = pytest.importorskip("torch", reason="the Hugging Face tests need torch")
transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")

VOCAB = 320
POSITIONS = 32


def load_f32(*args, **kw):
    """Llama.load with the f32 KV cache: HF models default to f16 (llama.cpp's choice), and the
    comparison with transformers (float32 throughout) is of the arithmetic, within 1e-4."""
    return Llama.load(*args, kv_type="f32", **kw)


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, err.getvalue()


def tiny_hf(tmp_path, kv_heads=4, theta=10000.0, tie=True, seed=0, dtype=None, vocab=VOCAB, **save):
    """A random LlamaForCausalLM saved to tmp_path/"hf"; returns (directory, model)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=64,
        rope_theta=theta, tie_word_embeddings=tie, rms_norm_eps=1e-5, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    directory = tmp_path / "hf"
    if dtype is None:
        model.save_pretrained(directory, **save)
        return directory, model
    with torch.no_grad():  # round the weights through dtype, keep float32 buffers (RoPE inv_freq)
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    copy.deepcopy(model).to(dtype).save_pretrained(directory, **save)  # .to() works in place
    return directory, model


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def token_ids(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, POSITIONS).tolist()


CASES = [  # (kv heads, rope theta, tied embeddings)
    pytest.param(4, 10000.0, True, id="mha-theta1e4-tied"),
    pytest.param(2, 1e6, False, id="gqa-theta1e6-untied"),
    pytest.param(1, 10000.0, False, id="mqa-theta1e4-untied"),
    pytest.param(2, 1e6, True, id="gqa-theta1e6-tied"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,theta,tie", CASES)
def test_direct_load_and_export_match_transformers(tmp_path, kv_heads, theta, tie):
    directory, model = tiny_hf(tmp_path, kv_heads, theta, tie)
    ids = token_ids()
    ref = reference_logits(model, ids)
    tok = byte_tokenizer(VOCAB)

    direct = load_f32(directory, tokenizer=tok)
    assert direct.config.rope_theta == theta and direct.config.n_kv_heads == kv_heads
    assert direct.config.shared_classifier == tie
    np.testing.assert_allclose(direct.logits(ids), ref, atol=1e-4, rtol=0)

    out = tmp_path / "model.bin"
    assert run_cli(["export", str(out), "--hf", str(directory)])[0] == 0
    exported = load_f32(out, tokenizer=tok)
    # version 3 keeps rope_theta, eps, BOS/EOS; the export un-permutes q/k to interleaved pairs
    assert direct.config.rope_style == "halves"
    assert exported.config == dataclasses.replace(direct.config, rope_style="interleaved")
    np.testing.assert_allclose(exported.logits(ids), ref, atol=1e-4, rtol=0)

    legacy = tmp_path / "legacy.bin"  # llama2.c's version 1 holds the weights exactly
    code, err = run_cli(["export", str(legacy), "--hf", str(directory), "--version", "1"])
    assert code == 0
    assert ("rope_theta" in err) == (theta != 10000.0)  # warns what v1 cannot record
    v1 = llama2c.load(legacy)
    for name, w in v1.weights.items():
        np.testing.assert_array_equal(w, exported.checkpoint.weights[name])


@pytest.mark.slow
def test_bf16_sharded_safetensors(tmp_path):
    directory, model = tiny_hf(tmp_path, kv_heads=2, theta=1e6, tie=False, dtype=torch.bfloat16,
                               max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    ids = token_ids()
    ref = reference_logits(model, ids)  # the bf16 weights, widened exactly to float32
    tok = byte_tokenizer(VOCAB)
    np.testing.assert_allclose(load_f32(directory, tokenizer=tok).logits(ids), ref, atol=1e-4, rtol=0)
    out = tmp_path / "bf16.bin"
    assert run_cli(["export", str(out), "--hf", str(directory), "--dtype", "bf16"])[0] == 0
    ckpt = llama2c.load(out)
    assert ckpt.dtype == "bf16"
    np.testing.assert_allclose(load_f32(out, tokenizer=tok).logits(ids), ref, atol=1e-4, rtol=0)
    # bf16 on disk, as the source: no wider than the safetensors shards (plus a header)
    assert out.stat().st_size <= sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def test_fp16_export_and_pytorch_model_bin(tmp_path):
    directory, model = tiny_hf(tmp_path, kv_heads=2, tie=False)
    # the older pytorch_model.bin layout, written by hand
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    ids = token_ids()
    ref = reference_logits(model, ids)
    tok = byte_tokenizer(VOCAB)
    np.testing.assert_allclose(load_f32(directory, tokenizer=tok).logits(ids), ref, atol=1e-4, rtol=0)
    out = tmp_path / "fp16.bin"
    assert run_cli(["export", str(out), "--hf", str(directory), "--dtype", "fp16"])[0] == 0
    assert llama2c.load(out).dtype == "fp16"
    np.testing.assert_allclose(load_f32(out, tokenizer=tok).logits(ids), ref, atol=2e-2, rtol=0)


def test_tokenizer_and_chat_template_come_with_the_model(tmp_path):
    directory, _ = tiny_hf(tmp_path, kv_heads=2)
    # a 512-token model needs a 512-token vocabulary: re-save with tok512's size
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["vocab_size"] == VOCAB
    (directory / "tokenizer.model").write_bytes(asset("tok512.model").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}"}))
    from llama2.formats import load_checkpoint
    loaded = load_checkpoint(directory)
    # the model's own Jinja, which a version-3 header records as the built-in it spells
    assert loaded.chat_template.source.startswith("{% for m in messages %}")
    assert loaded.chat_template.name == "chatml"
    assert loaded.vocab is not None and len(loaded.vocab) == 512
    # the vocabulary is larger than this model's 320 rows: Llama.load accepts it
    llama = load_f32(directory)
    assert llama.tokenizer.pieces == llama.checkpoint.tokenizer.pieces
    # export keeps the template in the version-3 header, --chat-template overrides it
    out = tmp_path / "chat.bin"
    assert run_cli(["export", str(out), "--hf", str(directory)])[0] == 0
    assert llama2c.load(out).chat_template == "chatml"
    assert run_cli(["export", str(out), "--hf", str(directory), "--chat-template", "llama2"])[0] == 0
    assert llama2c.load(out).chat_template == "llama2"


def test_run_hf_directory_from_the_cli(tmp_path, monkeypatch):
    """`llama2 run DIR` with the tokenizer in DIR: the same bytes as its exported .bin."""
    directory, _ = tiny_hf(tmp_path, kv_heads=2, vocab=512)
    (directory / "tokenizer.model").write_bytes(asset("tok512.model").read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "m.bin"
    assert run_cli(["export", str(out), "--hf", str(directory)])[0] == 0
    (tmp_path / "tok.bin").write_bytes(asset("tok512.bin").read_bytes())
    results = []
    for argv in (["run", str(directory)], ["run", str(out), "-z", str(tmp_path / "tok.bin")]):
        stdout, err = io.BytesIO(), io.StringIO()
        code = main(argv + ["-t", "1", "-s", "3", "-n", "40", "-i", "Once upon a time", "--kv-type", "f32"],
                    stdout=stdout, stderr=err, stdin=io.StringIO(""))
        assert code == 0, err.getvalue()
        results.append(stdout.getvalue())
    assert results[0] == results[1] and results[0].startswith(b"Once upon a time")


def test_unpermute_inverts_the_hf_permutation():
    from llama2.formats.hf import permute, unpermute
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)  # 4 heads of 8, 3 columns
    assert np.array_equal(unpermute(permute(w, 4), 4), w)
    # HF's rows of one head: the first halves of RoPE pairs, then the second halves
    assert permute(w, 4)[:8, 0].tolist() == w[[0, 2, 4, 6, 1, 3, 5, 7], 0].tolist()


def test_padded_embedding_and_tokenizer_bin_inside_the_directory(tmp_path, monkeypatch):
    """600 embedding rows, a 512-token tokenizer.model: ids past the tokenizer get placeholders.
    Without tokenizer files, the directory's own tokenizer.bin is used."""
    directory, _ = tiny_hf(tmp_path, kv_heads=2, vocab=600)
    monkeypatch.chdir(tmp_path)
    (directory / "tokenizer.bin").write_bytes(asset("tok512.bin").read_bytes())
    with pytest.raises(Exception, match=r"hf/tokenizer\.bin: tokenizer has 512 tokens"):
        load_f32(directory)
    (directory / "tokenizer.model").write_bytes(asset("tok512.model").read_bytes())
    llama = load_f32(directory)
    assert llama.tokenizer.vocab_size == 600 and llama.tokenizer.pieces[599] == b"<unused599>"
    from llama2.tokenizer import Tokenizer
    assert llama.tokenizer.pieces[:512] == Tokenizer.load(asset("tok512.bin")).pieces


def test_sharded_pytorch_model_bin(tmp_path):
    directory, model = tiny_hf(tmp_path, kv_heads=1, theta=1e6, tie=False)
    (directory / "model.safetensors").unlink()
    state = model.state_dict()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, directory / shard)
        weight_map |= {n: shard for n in part}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = token_ids()
    got = load_f32(directory, tokenizer=byte_tokenizer(VOCAB)).logits(ids)
    np.testing.assert_allclose(got, reference_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_folder_runs_in_place_in_its_stored_type(tmp_path, dtype):
    """safetensors are mapped, not read: every matrix is a view of its file in the stored type, q/k
    in HF's layout (rotate-half RoPE), and the logits still equal transformers'."""
    import mmap
    from llama2.formats import hf
    directory, model = tiny_hf(tmp_path, kv_heads=2, theta=1e6, tie=False,
                               dtype=None if dtype == "float32" else getattr(torch, dtype))
    ckpt = hf.load(directory)
    assert ckpt.config.rope_style == "halves" and ckpt.dtype == {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    for name in ("token_embedding", "wcls", *checkpoint.LAYER_MATRICES):
        for m in ckpt.weights[name] if isinstance(ckpt.weights[name], list) else [ckpt.weights[name]]:
            assert m.NAME == {"float32": "f32", "bfloat16": "bf16"}[dtype]
            base = m.storage
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap), name
    hf_q = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(ckpt.weights["wq"][0].dequantize(), hf_q)  # not un-permuted
    ids = token_ids()
    llama = load_f32(directory, tokenizer=byte_tokenizer(VOCAB))
    np.testing.assert_allclose(llama.logits(ids), reference_logits(model, ids), atol=1e-4, rtol=0)
    # decode steps (the compiled layer for float32) rotate the same halves
    cache = llama.model.new_cache()
    steps = np.concatenate([llama.model.forward([t], cache) for t in ids[:6]])
    np.testing.assert_allclose(steps, reference_logits(model, ids[:6]), atol=1e-4, rtol=0)


def test_hf_export_loads_in_transformers_with_our_tokens(tmp_path):
    """`export --format hf` of a GGUF: transformers' model gives our logits, its tokenizer our ids
    (run.c's and sentencepiece's rules differ on leading spaces: not compared here)."""
    out = tmp_path / "hf"
    err = io.StringIO()
    assert main(["export", str(out), "--from", str(asset("stories260K.gguf")), "--format", "hf"],
                stdout=io.BytesIO(), stderr=err, stdin=io.StringIO("")) == 0, err.getvalue()
    llm = Llama.load(asset("stories260K.gguf"), kv_type="f32")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["Once upon a time, there was a little girl", "Hello  world!\nNew line",
                 "émoji 🤖 ünïcode", "Lily's dog 123"]:
        assert tok(text)["input_ids"] == llm.encode(text), text
        assert tok.decode(llm.encode(text), skip_special_tokens=True) == text
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = llm.encode("Once upon a time, there was a little girl")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - llm.logits(ids)).max() < 1e-4


@pytest.mark.parametrize("scaling", [
    dict(kind="llama3", factor=32.0, original_context=8192, low_freq_factor=1.0, high_freq_factor=4.0),
    dict(kind="linear", factor=2.0), dict(kind="dynamic", factor=4.0)])
def test_config_json_keeps_rope_scaling(tmp_path, scaling):
    """export --format hf writes the source's RoPE scaling, and it reads back the same (before,
    a Llama 3.1/3.2 exported to a folder lost its scaling); per-frequency factors have no
    config.json form: refused before any tensor is written."""
    from llama2.config import ModelConfig, RopeScaling
    from llama2.errors import FormatError
    from llama2.formats import hf
    c = ModelConfig(dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300,
                    seq_len=512, rope_theta=500000.0, rope_scaling=RopeScaling(**scaling))
    (tmp_path / "config.json").write_text(json.dumps(hf.config_json(c)))
    back = hf.read_config(tmp_path)
    # linear / dynamic: the reader takes the context the scaling starts from as transformers does
    expected = c.rope_scaling if scaling["kind"] == "llama3" else dataclasses.replace(c.rope_scaling, original_context=512)
    assert back.rope_scaling == expected and back.rope_theta == c.rope_theta
    factors = dataclasses.replace(c, rope_scaling=RopeScaling("factors", freq_factors=(1.0,) * 8))
    with pytest.raises(FormatError, match="rope_freqs"):
        hf.export(tmp_path / "out", factors, lambda *a: None)
    assert not (tmp_path / "out").exists()
