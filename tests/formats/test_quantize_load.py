"""`--quantize TYPE` at load, for every type and mix the CLI takes: a float file quantized at load
holds exactly the tensors, types and bytes of llama.cpp's file of that type (shared/assets/kquant:
rand256, whose dimensions are multiples of 256), so it gives the same logits as loading that file;
impossible requests fail in one line."""

import io

import numpy as np
import pytest

from conftest import asset
from llama2 import quantize, weights
from llama2.checkpoint import LAYER_MATRICES
from llama2.config import Q8_GROUP_SIZE
from llama2.cli import main
from llama2.errors import UsageError
from llama2.formats import gguf, llama2c
from llama2.model import Transformer
from llama2.quantize.mix import QUANTIZE_TYPES
from llama2.weights import interleaved

LLAMA_CPP_FILES = ("q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "q4_k_m", "q5_k_m")  # in kquant/
TOKENS = [1, 17, 300, 42, 5, 99, 250, 7]


def matrices(model):  # -> {(our name, layer): Matrix}
    out = {("token_embedding", None): model.embedding, ("wcls", None): model.classifier}
    for l, layer in enumerate(model.layers):
        out.update({(name, l): getattr(layer, name) for name in LAYER_MATRICES})
    return out


def raw(m):  # the bytes as a file stores them (a layout made at load undone: weights.interleaved)
    if isinstance(m, interleaved.Matrix):
        return m.file_order().tobytes()
    return np.ascontiguousarray(m.blocks).view(np.uint8).tobytes()


def logits(model):
    return model.forward(TOKENS, model.new_cache(), all_logits=True)


@pytest.fixture(scope="module")
def f16():
    return gguf.load(asset("kquant/rand256-f16.gguf"))


def test_every_type_the_cli_takes_is_covered():
    assert set(QUANTIZE_TYPES) == {*LLAMA_CPP_FILES, "q8_0", "q4_k", "q5_k"}


@pytest.mark.parametrize("mix", LLAMA_CPP_FILES)
def test_quantize_at_load_equals_llama_cpp_file(f16, mix):
    ours = Transformer(f16, quantize=mix)
    theirs = Transformer(gguf.load(asset(f"kquant/rand256-{mix}.gguf")))
    mine, ref = matrices(ours), matrices(theirs)
    assert set(mine) == set(ref)
    for key, t in ref.items():
        m = mine[key]
        assert (m.NAME, m.shape, m.nbytes) == (t.NAME, t.shape, t.nbytes), key
        assert raw(m) == raw(t), key
    np.testing.assert_array_equal(logits(ours), logits(theirs))


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["q4_k", "q5_k"])
def test_uniform_k_types_at_load(f16, mix):
    # no llama.cpp file type of that name: the base type everywhere but the classifier (Q6_K)
    model = Transformer(f16, quantize=mix)
    for (name, layer), m in matrices(model).items():
        assert m.NAME == ("q6_k" if name == "wcls" else mix), (name, layer)
        src = weights.dense(f16.weights[name][layer] if layer is not None else f16.weights[name])
        want = weights.encode(m.NAME, src).data
        assert raw(m) == want.tobytes(), (name, layer)


def test_q8_0_at_load_is_our_int8_layout(f16):
    # q8_0 keeps its meaning: llama2.c's version-2 int8 (a float32 scale per Q8_GROUP_SIZE values, any shape)
    model = Transformer(f16, quantize="q8_0")
    for key, m in matrices(model).items():
        assert m.NAME == "int8_groups" and m.group_size == Q8_GROUP_SIZE, key
        src = weights.dense(f16.weights[key[0]][key[1]] if key[1] is not None else f16.weights[key[0]])
        assert np.abs(m.dequantize() - src).max() <= np.abs(src).max() / 254 * 1.0001
    ref = logits(Transformer(f16))
    got = logits(model)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_shared_classifier_gets_the_classifier_type():
    # a file without wcls: the embedding is the classifier, so a mix gives it Q6_K (llama.cpp's rule
    # for token_embd when there is no output.weight); rows of 64 fall back to Q8_0
    ckpt = llama2c.load(asset("stories260K.bin"))
    assert ckpt.config.shared_classifier
    model = Transformer(ckpt, quantize="q4_k_m")
    assert model.classifier is model.embedding and model.embedding.NAME == "q8_0"


@pytest.mark.parametrize("mix", ["q4_k", "q4_k_m", "q5_k_m", "q6_k"])
def test_k_quants_fall_back_on_short_rows(mix):
    # stories260K: dim 64, hidden 172: k-quants fall back as llama.cpp's quantizer does
    ckpt = llama2c.load(asset("stories260K.bin"))
    model = Transformer(ckpt, quantize=mix)
    w2 = model.layers[0].w2  # rows of 172: neither 256 nor 32 divides them
    assert w2.NAME == "f16"
    assert model.layers[0].wq.NAME == {"q4_k": "q5_0", "q4_k_m": "q5_0", "q5_k_m": "q5_1", "q6_k": "q8_0"}[mix]
    out = model.forward([1, 2, 3], model.new_cache())
    assert np.isfinite(out).all()


def test_impossible_type_is_one_line():
    ckpt = llama2c.load(asset("stories260K.bin"))
    with pytest.raises(UsageError, match=r"--quantize q4_0: blk\.0\.ffn_down \[64, 172\] has rows of 172 "
                                         r"values, not a multiple of q4_0's block of 32") as e:
        Transformer(ckpt, quantize="q4_0")
    assert "\n" not in str(e.value)


def test_cli_impossible_quantize_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "-n", "4",
                 "--quantize", "q5_1"], stdout=out, stderr=err, stdin=io.StringIO(""))
    assert code == 2 and err.getvalue().count("\n") == 1 and "--quantize q5_1" in err.getvalue()


def test_cli_runs_a_mix_at_load(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "-n", "24", "-t", "0",
                 "--quantize", "q4_k_m"], stdout=out, stderr=err, stdin=io.StringIO(""))
    assert code == 0, err.getvalue()
    assert len(out.getvalue().decode()) > 20
