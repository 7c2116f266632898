"""Our GGUF export of a Llama 3.2-shaped model in llama.cpp itself (llama-cpp-python, where it is
installed): a tiny random model made by transformers (tied embeddings, llama3 RoPE scaling, Meta's
128256-token tokenizer.model from the llama-models package), exported by `llama2 export --format
gguf`, loads in llama_cpp.Llama; its token ids equal ours over the tokenizer corpus, and its logits
are within a stated bound of ours."""

import io
import shutil

import numpy as np
import pytest

from tokenizer_corpus import CORPUS, clean, meta_tokenizer_path
from llama2 import Llama
from llama2.cli import main

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
torch = pytest.importorskip("torch", reason="making the model needs torch")
transformers = pytest.importorskip("transformers", reason="making the model needs transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
PROMPT = CORPUS[0] + " " + CORPUS[3]  # about 40 tokens

# Measured on PROMPT's 53 positions (llama-cpp-python 0.3.36, AVX-512), logits of std 1.65:
# F32 weights, both KV caches in f32: llama.cpp's F32 products keep float activations, so only the
# order of sums differs: max |difference| 1.1e-5, log-sum-exp 1e-6.
F32_BOUND = 1e-4
# F16 weights, each engine's default for a GGUF (both KV caches f16): llama.cpp rounds activations to
# f16 before its F16 products, we keep them float32: max |difference| 0.027, log-sum-exp 6.1e-4,
# argmax equal everywhere. (The shared golden's tiny-llama3 bound is 5e-3 on logits of std 0.65;
# this model's weights are wider.) The bounds leave room for other instruction-set levels' sums.
F16_BOUND = 0.05
LSE_BOUND = {"fp32": 1e-4, "fp16": 5e-3}

pytestmark = pytest.mark.slow  # a model with a 128256-row embedding, exported twice


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{"fp32": path, "fp16": path} of one random Llama 3.2-shaped model, exported by our CLI."""
    tokenizer = meta_tokenizer_path()
    tmp = tmp_path_factory.mktemp("llama3")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072, rope_parameters=LLAMA3_ROPE,
        bos_token_id=128000, eos_token_id=128001, rms_norm_eps=1e-5, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp / "hf")
    shutil.copyfile(tokenizer, tmp / "hf" / "tokenizer.model")
    out = {}
    for dtype in ("fp32", "fp16"):
        out[dtype] = tmp / f"llama3-{dtype}.gguf"
        err = io.StringIO()
        code = main(["export", str(out[dtype]), "--hf", str(tmp / "hf"), "--format", "gguf", "--dtype", dtype],
                    stdout=io.BytesIO(), stderr=err, stdin=io.StringIO(""))
        assert code == 0, err.getvalue()
    return out


def llama_cpp_model(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **kw)


def test_llama_cpp_reads_our_file_as_we_do(exported):
    ours = Llama.load(exported["fp16"])
    c = ours.config
    assert c.shared_classifier and c.rope_scaling.kind == "factors" and c.vocab_size == 128256
    theirs = llama_cpp_model(exported["fp16"])
    assert theirs.n_vocab() == c.vocab_size and theirs.n_embd() == c.dim
    assert (theirs.token_bos(), theirs.token_eos()) == (128000, 128001) == (c.bos_id, c.eos_id)
    meta = theirs.metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"


def test_token_ids_equal_llama_cpps_on_the_corpus(exported):
    ours = Llama.load(exported["fp16"])
    theirs = llama_cpp.Llama(model_path=str(exported["fp16"]), vocab_only=True, verbose=False)
    for text in CORPUS:
        # special tokens typed in text stay text on both sides
        assert theirs.tokenize(clean(text).encode(), add_bos=True, special=False) == ours.encode(text), text


@pytest.mark.parametrize("dtype, bound", [("fp32", F32_BOUND), ("fp16", F16_BOUND)])
def test_logits_within_the_bound_of_llama_cpps(exported, dtype, bound):
    if dtype == "fp32":
        ours = Llama.load(exported[dtype], kv_type="f32")
        theirs = llama_cpp_model(exported[dtype], type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    else:
        ours = Llama.load(exported[dtype])
        theirs = llama_cpp_model(exported[dtype])
    ids = ours.encode(PROMPT)
    assert len(ids) > 30
    theirs.eval(ids)
    want = np.array(theirs.scores[:len(ids)], dtype=np.float32)
    got = ours.logits(ids)
    np.testing.assert_allclose(got, want, atol=bound, rtol=0)
    # llama.cpp's argmax is ours, or within the bound of it (a near tie)
    assert np.all(got[np.arange(len(ids)), want.argmax(-1)] >= got.max(-1) - bound)
    np.testing.assert_allclose(log_sum_exp(got), log_sum_exp(want), atol=LSE_BOUND[dtype], rtol=0)


def log_sum_exp(logits):  # [T, V] -> [T]
    top = logits.max(-1)
    return np.log(np.exp(logits - top[:, None]).sum(-1)) + top
