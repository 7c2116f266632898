"""`llama2 export --format gguf --dtype TYPE` for the quantized types: the files hold llama.cpp's
per-tensor types and bytes, read back with the gguf package, and bad requests fail in one line."""

import io

import gguf as gguf_pkg
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from conftest import asset, golden
from llama2 import quantize
from llama2.cli import main

LLAMA_CPP_FILES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "q4_k_m", "q5_k_m")


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    return main(argv, stdout=out, stderr=err, stdin=io.StringIO("")), err.getvalue()


def export(tmp_path, dtype, src=None):
    out = tmp_path / f"out-{dtype}.gguf"
    code, err = run_cli(["export", str(out), "--from", str(src or asset("kquant/rand256-f16.gguf")),
                         "--format", "gguf", "--dtype", dtype])
    assert code == 0, err
    return out


def tensors(path):
    return {t.name: t for t in gguf_pkg.GGUFReader(path).tensors}


@pytest.mark.parametrize("dtype", LLAMA_CPP_FILES)
def test_export_equals_llama_cpp_file(tmp_path, dtype):
    """From the same f16 file, our export holds llama.cpp's tensors: same names, types, shapes and
    bytes (so llama.cpp reads it as it reads its own)."""
    ours = tensors(export(tmp_path, dtype))
    theirs = tensors(asset(f"kquant/rand256-{dtype}.gguf"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        o = ours[name]
        assert o.tensor_type == t.tensor_type and list(o.shape) == list(t.shape), name
        assert np.array(o.data).tobytes() == np.array(t.data).tobytes(), name
    reader = gguf_pkg.GGUFReader(tmp_path / f"out-{dtype}.gguf")
    assert int(reader.fields["general.file_type"].contents()) == quantize.FILE_TYPES[dtype]
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 512  # the vocabulary came along


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["q4_k", "q5_k"])
def test_export_uniform_k_types(tmp_path, dtype):
    """q4_k / q5_k: every matrix in that type except the classifier (Q6_K, as llama.cpp keeps it);
    the weights come back close to the source."""
    src = {name: np.array(t.data).astype(np.float32) for name, t in
           tensors(asset("kquant/rand256-f16.gguf")).items()}
    bound = {"q4_k": 0.08, "q5_k": 0.04}[dtype]  # rms error / rms weight (Gaussian: 0.070, 0.036)
    for name, t in tensors(export(tmp_path, dtype)).items():
        want = "F32" if name.endswith("norm.weight") else "Q6_K" if name == "output.weight" else dtype.upper()
        assert t.tensor_type.name == want, name
        back = dequantize(np.array(t.data), t.tensor_type).reshape(src[name].shape)
        rel = np.sqrt(np.mean((back - src[name]) ** 2) / np.mean(src[name] ** 2))
        assert rel < (bound if want != "F32" else 1e-7), (name, rel)


def test_short_rows_fall_back_as_llama_cpp_does(tmp_path):
    """stories260K (dim 64, hidden 172) in q4_k_m: 64-wide rows become Q5_0, the classifier Q8_0
    (token_embd: the classifier is shared, so the file has no output.weight), ffn_down's 172-wide
    rows F16; a legacy type that cannot cut 172 fails in one line."""
    path = export(tmp_path, "q4_k_m", asset("stories260K.bin"))
    types = {name: t.tensor_type.name for name, t in tensors(path).items()}
    assert "output.weight" not in types
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q5_0"
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(5)} == {"F16"}
    out = tmp_path / "q4_0.gguf"
    code, err = run_cli(["export", str(out), "--from", str(asset("stories260K.bin")), "--format",
                         "gguf", "--dtype", "q4_0"])
    assert code != 0 and err.count("\n") == 1 and "Q4_0" in err and "multiples of 32" in err
    assert not out.exists()


def test_failed_export_keeps_the_old_file(tmp_path):
    """The file is written to a temporary name and renamed: a failure leaves what was there."""
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")
    code, _ = run_cli(["export", str(out), "--from", str(asset("stories260K.bin")), "--format", "gguf",
                       "--dtype", "q8_0"])
    assert code != 0 and out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary left behind


@pytest.mark.parametrize("argv, words", [
    (["--format", "gguf", "--dtype", "q3_k"], ["--dtype", "q3_k", "q4_k_m"]),
    (["--dtype", "q4_k"], ["--dtype q4_k", "--format gguf"]),
])
def test_bad_dtype_is_a_usage_error(tmp_path, argv, words):
    out = tmp_path / "x.gguf"
    code, err = run_cli(["export", str(out), "--from", str(asset("stories260K.bin")), *argv])
    assert code == 2 and err.startswith("llama2: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words) and not out.exists()


@pytest.mark.parametrize("command", ["run", "serve"])
def test_bad_quantize_is_a_usage_error(command):
    code, err = run_cli([command, "model.bin", "--quantize", "q3_k"])
    assert code == 2 and err.count("\n") == 1 and "--quantize" in err and "q4_k_m" in err


def test_llama_cpp_runs_our_q4_k_m(tmp_path):
    """llama.cpp loads our Q4_K_M export and gives the logits it gives on its own quantization."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    ref = np.load(golden("llamacpp_kquant_logits.npz"))
    path = export(tmp_path, "q4_k_m")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                            verbose=False)
    ids = [int(i) for i in ref["ids"]]
    model.eval(ids)
    ours = np.array(model.scores[: len(ids)])
    np.testing.assert_allclose(ours, ref["q4_k_m"], rtol=0, atol=1e-4)
    assert (ours.argmax(axis=1) == ref["q4_k_m"].argmax(axis=1)).all()


LLAMA_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17,
                "q6_k": 18}


def test_llama_cpp_quantizer_on_awkward_weights(tmp_path):
    """llama.cpp's own quantizer (llama_model_quantize) on an F32 file of heavy-tailed weights with
    zero, constant, tiny and spiky rows makes the same tensors as our export of every type."""
    import ctypes

    from conftest import byte_tokenizer
    from llama2 import checkpoint
    from llama2.formats import llama2c
    from llama2.config import ModelConfig

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    config = ModelConfig(dim=256, hidden_dim=512, n_layers=3, n_heads=4, n_kv_heads=2,
                         vocab_size=320, seq_len=64)
    rng = np.random.default_rng(7)
    weights = {}
    for name, shape in checkpoint.tensor_shapes(config).items():
        if name.startswith("rms"):
            weights[name] = np.ones(shape, np.float32)
            continue
        w = (0.05 * rng.standard_t(3, shape)).astype(np.float32)
        rows = w.reshape(-1, shape[-1])
        rows[0], rows[1], rows[2] = 0, 0.02, rows[2] * 1e-6  # zero, constant, tiny
        rows[3, ::97] = 5.0  # spikes
        rows[4, :shape[-1] // 2] = 0  # half zero: zero sub-blocks inside a super-block
        weights[name] = w
    src, tok = tmp_path / "awkward.bin", tmp_path / "tok.bin"
    llama2c.write(src, config, weights, version=1)
    byte_tokenizer(config.vocab_size).save(tok)
    f32 = tmp_path / "f32.gguf"
    assert run_cli(["export", str(f32), "--from", str(src), "--format", "gguf", "--tokenizer",
                    str(tok)])[0] == 0
    for dtype, ftype in LLAMA_FTYPES.items():
        ours = tensors(export(tmp_path, dtype, src))
        theirs_path = tmp_path / f"llama-{dtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(),
                                              ctypes.byref(params)) == 0
        for name, t in tensors(theirs_path).items():
            assert ours[name].tensor_type == t.tensor_type, (dtype, name)
            assert np.array(ours[name].data).tobytes() == np.array(t.data).tobytes(), (dtype, name)
