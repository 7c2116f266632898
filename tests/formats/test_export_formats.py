"""llama2.c layouts, our extended header and GGUF: round trips on stories260K (bytes and logits),
int8 error bounds, and the extended header's documented byte offsets."""

import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, asset, byte_tokenizer, random_weights
from llama2 import Llama, checkpoint
from llama2 import weights as llama2_weights
from llama2.cli import main
from llama2.config import ModelConfig
from llama2.errors import FormatError
from llama2.formats import gguf, llama2c, load_checkpoint
from llama2.weights import bf16 as bfloat16
from llama2.tokenizer import Tokenizer
from test_export_errors import HF_CONFIG, hf_tensors, write_safetensors

PROMPT_IDS = [1, 403, 407, 261, 378, 383, 286, 300, 270, 290, 281, 320]


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    return main(argv, stdout=out, stderr=err, stdin=io.StringIO("")), err.getvalue()


def export(out, src, *flags):
    code, err = run_cli(["export", str(out), "--from", str(src), *flags])
    assert code == 0, err
    return out


def logits(path):
    return Llama.load(path, tokenizer=asset("tok512.bin")).logits(PROMPT_IDS)


def test_round_trip_v0_v1_v2_v3(tmp_path):
    v0 = asset("stories260K.bin")
    v1 = export(tmp_path / "v1.bin", v0, "--version", "1")
    assert v1.read_bytes() == asset("stories260K_v1.bin").read_bytes()
    v2 = export(tmp_path / "v2.bin", v1, "--version", "2", "--group-size", "8")
    assert v2.read_bytes() == asset("stories260K-q8.bin").read_bytes()
    # version 3 with fp32 keeps every weight; with q8_0 it re-quantizes v2's values to themselves
    v3 = export(tmp_path / "v3.bin", v1, "--version", "3")
    v3q = export(tmp_path / "v3q.bin", v2, "--version", "3", "--dtype", "q8_0", "--group-size", "8")
    base = logits(v0)
    for path in (v1, v3):
        np.testing.assert_array_equal(logits(path), base)
    a, b = llama2c.load(v2), llama2c.load(v3q)
    assert b.dtype == "q8_0" and b.group_size == 8 and b.config == a.config
    for name in ("token_embedding", *checkpoint.LAYER_MATRICES):
        ta = a.weights[name] if isinstance(a.weights[name], list) else [a.weights[name]]
        tb = b.weights[name] if isinstance(b.weights[name], list) else [b.weights[name]]
        for x, y in zip(ta, tb):
            np.testing.assert_array_equal(x.q, y.q)
            np.testing.assert_array_equal(x.s, y.s)
    np.testing.assert_array_equal(logits(v3q), logits(v2))
    # and back down: version 3 -> version 1 gives llama2.c's file again
    assert export(tmp_path / "back.bin", v3, "--version", "1").read_bytes() == v1.read_bytes()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_extended_header(tmp_path, dtype):
    out = export(tmp_path / f"{dtype}.bin", asset("stories260K.bin"), "--dtype", dtype)
    ckpt = llama2c.load(out)
    assert ckpt.dtype == dtype and ckpt.version == 3
    src = llama2c.load(asset("stories260K.bin"))
    for name, w in src.weights.items():
        got = ckpt.dense(name)
        if name.startswith("rms"):  # norms stay float32
            np.testing.assert_array_equal(got, w)
            continue
        stored = ckpt.weights[name]  # kept in half precision: a view of the file, not widened
        for m in stored if isinstance(stored, list) else [stored]:
            assert m.NAME == {"fp16": "f16", "bf16": "bf16"}[dtype] and m.blocks.itemsize == 2
        if dtype == "fp16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        else:  # bf16 keeps 8 significant bits: round to nearest is within half an ulp, 2^-9
            assert np.all(np.abs(got - w) <= np.abs(w) * 2.0 ** -8), name
    # fp32 again from the half-precision file: the widened values, and the same logits as them up to
    # float32 summation order (the half-precision file runs on the native kernels, in place)
    back = export(tmp_path / "back.bin", out, "--version", "1")
    np.testing.assert_array_equal(llama2c.load(back).dense("wq"), ckpt.dense("wq"))
    np.testing.assert_allclose(logits(back), logits(out), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(out), logits(asset("stories260K.bin")),
                               atol={"fp16": 0.05, "bf16": 0.3}[dtype])


@pytest.mark.parametrize("group_size", [4, 8, 100])
def test_int8_export_within_half_a_scale(tmp_path, group_size):
    """hidden_dim 172 is not a multiple of 8: groups straddle rows. With 100 every matrix also ends
    in a short tail group (64*172 = 110*100 + 8), which must be kept, not dropped."""
    out = export(tmp_path / "q.bin", asset("stories260K.bin"), "--version", "2", "--group-size",
                 str(group_size))
    q, src = llama2c.load(out), llama2c.load(asset("stories260K.bin"))
    assert q.group_size == group_size
    for name in ("token_embedding", *checkpoint.LAYER_MATRICES):
        tensors = q.weights[name] if isinstance(q.weights[name], list) else [q.weights[name]]
        originals = src.weights[name] if name in checkpoint.LAYER_MATRICES else [src.weights[name]]
        for qt, w in zip(tensors, originals):
            flat = w.reshape(-1)
            assert qt.s.size == -(-flat.size // group_size)  # the tail group is there
            err = np.abs(qt.dequantize().reshape(-1) - flat)
            bound = np.repeat(qt.s, group_size)[: flat.size] / 2
            assert np.all(err <= bound * (1 + 1e-6) + 1e-12), name


def test_extended_header_byte_offsets(tmp_path):
    """The table in docs/format.md, checked field by field."""
    config = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320,
                         seq_len=64, shared_classifier=False, rope_theta=1e6, norm_eps=1e-6,
                         bos_id=5, eos_id=7)
    out = tmp_path / "x.bin"
    llama2c.write(out, config, random_weights(config), version=3, group_size=16, dtype="q8_0",
                  chat_template="chatml")
    raw = out.read_bytes()
    assert struct.unpack_from("<I", raw, 0)[0] == 0x616B3432 and raw[:4] == b"24ka"
    assert struct.unpack_from("<i", raw, 4)[0] == 3
    assert struct.unpack_from("<7i", raw, 8) == (32, 64, 2, 4, 2, 320, 64)
    assert (raw[36], raw[37], raw[38], raw[39]) == (0, 3, 2, 0)  # unshared, q8_0, chatml
    assert struct.unpack_from("<3i", raw, 40) == (16, 5, 7)
    assert struct.unpack_from("<2d", raw, 56) == (1e6, 1e-6)
    assert raw[72:256] == bytes(184)
    back = llama2c.load(out)
    assert back.config == config and back.chat_template == "chatml" and back.quantized


def test_truncated_extended_file_is_rejected(tmp_path):
    out = tmp_path / "x.bin"
    llama2c.write(out, TINY, random_weights(TINY), version=3, dtype="fp16")
    out.write_bytes(out.read_bytes()[:-2])
    with pytest.raises(FormatError, match="truncated"):
        llama2c.load(out)


def assert_same_tensors(infos, buf, ref_infos, ref_buf):
    """Every tensor of one GGUF (F32 or Q8_0, as gguf.read lists them) has the other's type, shape and bytes."""
    for name, (kind, shape, offset) in infos.items():
        rkind, rshape, roffset = ref_infos[name]
        assert (kind, shape) == (rkind, rshape), name
        size = int(np.prod(shape)) // 32 * 34 if kind == gguf.Q8_0 else 4 * int(np.prod(shape))
        assert buf[offset:offset + size] == ref_buf[roffset:roffset + size], name


def test_gguf_export_equals_reference(tmp_path):
    ref_path = asset("stories260K.gguf")
    out = tmp_path / "s.gguf"
    code, err = run_cli(["export", str(out), "--from", str(asset("stories260K.bin")), "--format", "gguf",
                         "--tokenizer", str(asset("tok512.bin"))])
    assert code == 0, err
    meta, infos, buf = gguf.read(out)
    ref_meta, ref_infos, ref_buf = gguf.read(ref_path)
    # llama.cpp's llama2.c converter wrote the shared classifier twice, also as output.weight; ours
    # ties it (token_embd alone), as its convert_hf_to_gguf does: the copy must equal our token_embd
    assert list(infos) == [name for name in ref_infos if name != "output.weight"]
    assert_same_tensors(infos, buf, ref_infos, ref_buf)
    assert_same_tensors({"output.weight": infos["token_embd.weight"]}, buf, ref_infos, ref_buf)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "llama.rope.dimension_count", "llama.attention.head_count_kv"):
        assert meta[key] == ref_meta[key], key
    # and with the gguf package, when present, as a second reader
    gguf_pkg = pytest.importorskip("gguf", reason="the gguf package cross-check needs gguf")
    ours = {t.name: np.asarray(t.data) for t in gguf_pkg.GGUFReader(str(out)).tensors}
    ours["output.weight"] = ours["token_embd.weight"]
    for t in gguf_pkg.GGUFReader(str(ref_path)).tensors:
        np.testing.assert_array_equal(ours[t.name], np.asarray(t.data))


def test_gguf_loads_in_llama_cpp(tmp_path):
    """llama.cpp runs our GGUF exactly as it runs the published one (same tensors, same vocabulary),
    and agrees with our engine up to its float16 KV cache."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path / "s.gguf"
    assert run_cli(["export", str(out), "--from", str(asset("stories260K.bin")), "--format", "gguf",
                    "--tokenizer", str(asset("tok512.bin"))])[0] == 0

    def run(path):
        model = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                                verbose=False)
        text = "Once upon a time, there was a little girl"
        assert model.tokenize(text.encode()) == Tokenizer.load(asset("tok512.bin")).encode(text)
        model.eval(PROMPT_IDS)
        return np.array(model.scores[: len(PROMPT_IDS)])

    ours = run(out)
    np.testing.assert_array_equal(ours, run(asset("stories260K.gguf")))
    np.testing.assert_allclose(ours, logits(asset("stories260K.bin")), atol=0.05)
    assert (ours.argmax(-1) == logits(asset("stories260K.bin")).argmax(-1)).all()


def test_gguf_direct_load_matches_bin():
    # tokenizer from the GGUF metadata; the KV cache in f32 as the .bin's (a GGUF's default is f16)
    g = Llama.load(asset("stories260K.gguf"), kv_type="f32")
    b = Llama.load(asset("stories260K.bin"), tokenizer=asset("tok512.bin"))
    assert b.model.kv_type == "f32"
    assert g.tokenizer.pieces == b.tokenizer.pieces and g.tokenizer.scores == b.tokenizer.scores
    assert g.encode("Once upon a time") == b.encode("Once upon a time")
    np.testing.assert_array_equal(g.logits(PROMPT_IDS), b.logits(PROMPT_IDS))
    assert "".join(g.generate("Once upon a time", steps=40, temperature=0)) == \
        "".join(b.generate("Once upon a time", steps=40, temperature=0))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "q8_0"])
def test_gguf_types_round_trip(tmp_path, dtype):
    weights = random_weights(TINY)  # dims are multiples of 32, as GGUF Q8_0 needs
    src = tmp_path / "tiny.bin"
    llama2c.write(src, TINY, weights, version=1)
    out = tmp_path / "tiny.gguf"
    assert run_cli(["export", str(out), "--from", str(src), "--format", "gguf", "--dtype", dtype])[0] == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.dim == TINY.dim and ckpt.quantized == (dtype == "q8_0")
    wq = llama2_weights.dense(ckpt.weights["wq"][1])
    tol = {"fp16": 1e-3, "bf16": 4e-3, "q8_0": 0.5 / 127 * np.abs(weights["wq"][1]).max()}[dtype]
    np.testing.assert_allclose(wq, weights["wq"][1], atol=tol, rtol=0)
    gguf_pkg = pytest.importorskip("gguf", reason="the gguf package cross-check needs gguf")
    if dtype == "q8_0":  # our Q8_0 blocks dequantize as ggml's do
        t = next(t for t in gguf_pkg.GGUFReader(str(out)).tensors if t.name == "blk.1.attn_q.weight")
        np.testing.assert_array_equal(gguf_pkg.dequantize(t.data, t.tensor_type).reshape(wq.shape), wq)


def test_quantize_in_chunks_equals_at_once():
    w = np.random.default_rng(0).standard_normal((13, 172)).astype(np.float32)
    whole = llama2c.quantize_q80(w, 8, chunk_values=1 << 20)
    parts = llama2c.quantize_q80(w, 8, chunk_values=40)  # 5 groups per chunk, tail group last
    np.testing.assert_array_equal(whole.q, parts.q)
    np.testing.assert_array_equal(whole.s, parts.s)


def test_run_gguf_and_exported_files_like_bin(tmp_path, monkeypatch):
    """`llama2 run model.gguf` takes the vocabulary from the GGUF and prints what the .bin prints."""
    monkeypatch.chdir(tmp_path)
    flags = ["-t", "0", "-n", "60", "-i", "Once upon a time"]
    out, err = io.BytesIO(), io.StringIO()
    assert main(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), *flags],
                stdout=out, stderr=err) == 0, err.getvalue()
    v3 = export(tmp_path / "v3.bin", asset("stories260K.bin"), "--dtype", "fp32")
    for model, extra in ((asset("stories260K.gguf"), []), (v3, ["-z", str(asset("tok512.bin"))])):
        got, err = io.BytesIO(), io.StringIO()
        assert main(["run", str(model), *extra, *flags], stdout=got, stderr=err) == 0, err.getvalue()
        assert got.getvalue() == out.getvalue()


def test_loading_needs_no_heavy_dependencies(tmp_path):
    """GGUF and Hugging Face safetensors load with numpy alone: no torch, gguf or safetensors."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    write_safetensors(hf / "model.safetensors", hf_tensors(HF_CONFIG))
    code = ("import sys; from llama2.formats import load_checkpoint; "
            f"load_checkpoint({str(asset('stories260K.gguf'))!r}); load_checkpoint({str(hf)!r}); "
            "heavy = {'torch', 'gguf', 'safetensors', 'sentencepiece', 'transformers'} & "
            "{m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    src = str(checkpoint.__file__).rsplit("/llama2/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_gguf_q8_0_runs_int8_and_exports_losslessly(tmp_path):
    """A Q8_0 GGUF stays in its blocks in memory, and int8 (group 32) in a version-3 export made
    from it."""
    src = tmp_path / "tiny.bin"
    llama2c.write(src, TINY, random_weights(TINY), version=1)
    q8 = tmp_path / "tiny.gguf"
    assert run_cli(["export", str(q8), "--from", str(src), "--format", "gguf", "--version", "2"])[0] == 0
    g = load_checkpoint(q8)
    assert g.quantized and g.group_size == 32 and g.dtype == "q8_0"
    v3 = export(tmp_path / "v3.bin", q8, "--dtype", "q8_0", "--group-size", "32")
    b = llama2c.load(v3)
    for name in ("token_embedding", "wq", "w2"):
        x = g.weights[name][1] if name != "token_embedding" else g.weights[name]
        y = b.weights[name][1] if name != "token_embedding" else b.weights[name]
        assert x.NAME == "q8_0" and y.NAME == "int8_groups"
        np.testing.assert_array_equal(x.blocks["qs"].reshape(y.q.shape), y.q)
        np.testing.assert_array_equal(x.blocks["d"].astype(np.float32).reshape(-1), y.s)
    tok = byte_tokenizer(TINY.vocab_size)
    ids = list(range(3, 40))
    a = Llama.load(q8, tokenizer=tok).logits(ids)
    # the same int8 weights; the GGUF's integer kernels also round activations to int8 (llama.cpp's
    # rule), the version-3 file's kernels keep them float (measured: 0.034)
    np.testing.assert_allclose(a, Llama.load(v3, tokenizer=tok).logits(ids), atol=0.05)
    np.testing.assert_allclose(a, Llama.load(src, tokenizer=tok).logits(ids), atol=0.1)  # int8 vs fp32


def test_gguf_q8_0_encoding_in_chunks(monkeypatch):
    w = np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)
    whole = gguf._encode(w, gguf.Q8_0).tobytes()
    monkeypatch.setattr("llama2.weights.ggml_quants.CHUNK_VALUES", 7 * 32)
    assert gguf._encode(w, gguf.Q8_0).tobytes() == whole


def test_bf16_rounding():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3, np.inf, np.nan, 3.0e38], np.float32)
    got = bfloat16.bf16_to_f32(bfloat16.f32_to_bf16(x, chunk=3))
    # 1 + 2^-8 is halfway between bf16 neighbours: to even (1.0); 1 + 3*2^-8 rounds up to 1 + 2^-6
    assert got[:2].tolist() == [1.0, 1.0] and got[2] == np.float32(1.015625)
    assert abs(got[3] / x[3] - 1) <= 2 ** -9 and got[4] == np.inf and np.isnan(got[5])
    assert np.isfinite(got[6])


def test_gguf_fp16_runs_in_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src, tok = tmp_path / "tiny.bin", tmp_path / "tok.bin"
    llama2c.write(src, TINY, random_weights(TINY, scale=0.3), version=1)
    byte_tokenizer(TINY.vocab_size).save(tok)
    out = tmp_path / "tiny.gguf"
    assert run_cli(["export", str(out), "--from", str(src), "--format", "gguf", "--dtype", "fp16",
                    "--tokenizer", str(tok)])[0] == 0
    ids = [1] + list(range(40, 60))
    model = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    model.eval(ids)
    theirs = np.array(model.scores[: len(ids)])
    ours = Llama.load(out, tokenizer=tok).logits(ids)
    np.testing.assert_allclose(theirs, ours, atol=0.05 * np.abs(ours).max())


def test_gguf_q8_0_equals_llama_cpp_quantizer(tmp_path):
    """Our Q8_0 GGUF holds the same bytes as llama.cpp's own quantizer makes from our F32 GGUF.
    (Running tiny Q8_0 models in this llama-cpp-python build crashes inside libggml-cpu, for its
    own quantized file as well, so this checks the bytes rather than the logits.)"""
    import ctypes
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    src, tok = tmp_path / "tiny.bin", tmp_path / "tok.bin"
    llama2c.write(src, TINY, random_weights(TINY, scale=0.3), version=1)
    byte_tokenizer(TINY.vocab_size).save(tok)
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "q8.gguf", tmp_path / "ref.gguf"
    for out, dtype in ((f32, "fp32"), (ours, "q8_0")):
        assert run_cli(["export", str(out), "--from", str(src), "--format", "gguf", "--dtype", dtype,
                        "--tokenizer", str(tok)])[0] == 0
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    _, a, abuf = gguf.read(ours)
    _, b, bbuf = gguf.read(theirs)
    assert set(a) == set(b)
    assert_same_tensors(a, abuf, b, bbuf)
