"""GGUF files from llama.cpp's own quantizer (shared/assets/kquant): every tensor used as stored (a
view of the memory map, as many bytes as the file holds), and teacher-forced logits against
llama.cpp's on the same file (shared/golden/llamacpp_kquant_logits.npz)."""

import json
import mmap

import numpy as np
import pytest

import forward_reference
from conftest import asset, golden
from llama2 import kvcache, native, weights
from llama2.checkpoint import LAYER_MATRICES
from llama2.formats import gguf
from llama2.model import Transformer

FILES = ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]

# Bounds on |ours - llama.cpp| over all 24 x 512 teacher-forced logits (std about 8), per file, and
# the least number of the 24 positions whose argmax must agree. llama.cpp keeps its KV cache in
# float16 and rounds q and the attention probabilities to float16 for their products (its F16
# vec_dot); we keep float32, which is most of the difference that remains.
LOGIT_BOUND = {"f16": 0.1, "q8_0": 0.8, "q4_0": 1.1, "q4_1": 1.2, "q5_0": 0.9, "q5_1": 1.0,
               "q4_k_m": 1.2, "q5_k_m": 1.2, "q6_k": 1.2}
ARGMAX_AGREE = {"f16": 24, "q8_0": 22, "q4_0": 23, "q4_1": 22, "q5_0": 23, "q5_1": 23,
                "q4_k_m": 21, "q5_k_m": 20, "q6_k": 22}
# The same with llama.cpp's float16 attention emulated (f16_attention below): what is left is the
# weights' and activations' arithmetic alone, where our kernels follow llama.cpp's rule.
F16_ATTENTION_BOUND = {"f16": 0.06, "q8_0": 1e-4, "q4_0": 0.6, "q4_1": 1.0, "q5_0": 0.4, "q5_1": 1.0,
                       "q4_k_m": 1e-4, "q5_k_m": 0.7, "q6_k": 0.3}


def mapped_base(arr):
    """The object at the bottom of an array's chain of views."""
    while isinstance(arr, np.ndarray) and arr.base is not None:
        arr = arr.base
    return arr.obj if isinstance(arr, memoryview) else arr


@pytest.mark.parametrize("name", FILES)
def test_every_tensor_is_a_view_of_the_file_in_its_stored_type(name):
    gguf_pkg = pytest.importorskip("gguf", reason="the tensor sizes come from the gguf package")
    path = asset(f"kquant/rand256-{name}.gguf")
    types = json.loads(asset("kquant/tensor_types.json").read_text())[name]
    ckpt = gguf.load(path)
    _, infos, _ = gguf.read(path)
    seen = set()
    for ours, theirs in gguf.NAMES.items():
        if ours.startswith("rms"):
            continue
        layers = range(ckpt.config.n_layers) if ours in LAYER_MATRICES else [None]
        for layer in layers:
            kind, shape, offset = infos[theirs.format(layer)]
            value = ckpt.weights[ours][layer] if layer is not None else ckpt.weights[ours]
            m = weights.matrix(value)
            block, size = gguf_pkg.GGML_QUANT_SIZES[gguf_pkg.GGMLQuantizationType(kind)]
            assert m.GGML_TYPE == kind and m.shape == tuple(shape)
            assert m.nbytes == np.prod(shape) // block * size  # not widened
            mapped = mapped_base(m.storage)
            assert isinstance(mapped, mmap.mmap)  # not copied: at the tensor's offset in the map
            start = np.frombuffer(mapped, np.uint8).__array_interface__["data"][0]
            assert m.storage.__array_interface__["data"][0] == start + offset
            seen.add(weights.GGML_NAMES[kind])
    assert seen == set(types) - {"F32"} or seen == set(types)  # F32 holds the norms only


def f16_attention(kvtype, q, k_pool, v_pool, tables, starts, counts, out, window=0):
    """native.attention as llama.cpp computes it (no flash attention): q, k, v rounded to float16
    (its KV cache, and q converted for the F16 dot products); the scaled causal softmax in float32;
    the probabilities rounded to float16 for the product with v. No sliding window (these models
    have none)."""
    assert window == 0
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    t = next(m for m in kvcache.TYPES.values() if m.ID == kvtype)
    _, H, hd = q.shape
    _, KVH, bt, rb = k_pool.shape
    row = 0
    for table, start, T in zip(tables, starts, counts):
        S = start + T
        ids = table[:-(-S // bt)]
        k, v = (t.reference.decode(p[ids].transpose(1, 0, 2, 3).reshape(KVH, -1, rb)[:, :S], hd) for p in (k_pool, v_pool))
        qh = np.ascontiguousarray(f16(q[row:row + T]).reshape(T, KVH, H // KVH, hd).transpose(1, 2, 0, 3))
        scores = np.matmul(qh, f16(k).transpose(0, 2, 1)[:, None]) / np.sqrt(np.float32(hd))  # [KVH, g, T, S]
        scores[..., np.arange(S)[None, :] > start + np.arange(T)[:, None]] = -np.inf  # query t sees start + t + 1 keys
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        att = np.matmul(f16(scores), f16(v)[:, None])  # [KVH, g, T, hd]
        out[row:row + T] = att.transpose(2, 0, 1, 3).reshape(T, H * hd)
        row += T


def teacher_forced(name, attention=None):
    """(max |our logits - llama.cpp's|, positions whose argmax agrees) over one prompt pass; with
    `attention`, the step-by-step reference pass (bit for bit the native one, test_forward.py) with
    that attention instead of ours."""
    ref = np.load(golden("llamacpp_kquant_logits.npz"))
    model = Transformer(gguf.load(asset(f"kquant/rand256-{name}.gguf")))
    if attention is None:
        logits = model.forward(ref["ids"], model.new_cache(), all_logits=True)
    else:
        logits = forward_reference.forward_batch(model, [(0, ref["ids"])], model.new_cache(), True, attention)
    theirs = ref[name]
    return np.abs(logits - theirs).max(), int((logits.argmax(axis=1) == theirs.argmax(axis=1)).sum())


@pytest.mark.parametrize("name", FILES)
def test_teacher_forced_logits_match_llama_cpp(name):
    diff, agree = teacher_forced(name)
    print(f"{name}: max |diff| {diff:.4g}, argmax agrees on {agree}/24")
    assert diff <= LOGIT_BOUND[name] and agree >= ARGMAX_AGREE[name], (diff, agree)


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa_level(request):
    """Each instruction-set level of the native kernels this CPU runs, restored afterwards."""
    if request.param not in native.supported():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    before = native.kernels()
    native.select(request.param)
    yield request.param
    native.select_kernels(before)


@pytest.mark.parametrize("name", FILES)
def test_with_llama_cpp_attention_the_logits_agree_closely(name, isa_level):
    # The integer kernels quantize activations as llama.cpp does (native extension, every level).
    diff, agree = teacher_forced(name, f16_attention)
    print(f"{name} ({isa_level}): max |diff| {diff:.4g} with float16 attention, argmax {agree}/24")
    assert diff <= F16_ATTENTION_BOUND[name], diff


@pytest.mark.parametrize("load_level", native.supported())
def test_q4_k_is_regrouped_at_load_and_gives_the_same_bits(monkeypatch, restore_level, load_level):
    """Loaded at the AVX-512 level, Transformer regroups every Q4_K matrix into its layout
    (weights.interleaved), the embedding's lookups aside; other types, and every type at the other
    levels, stay views of the file. The logits of a pass are bit for bit those of the model as
    mapped, at every level (the layout's kernels read the same bytes at each)."""
    from llama2 import model as model_module
    from llama2.weights import interleaved
    ckpt = gguf.load(asset("kquant/rand256-q4_k_m.gguf"))
    native.select(load_level)
    regrouped = Transformer(ckpt)
    monkeypatch.setattr(model_module, "interleaved", lambda m: m)
    mapped = Transformer(ckpt)
    expect = load_level == "avx512"
    for m, was in zip(regrouped.matrices(), mapped.matrices()):
        assert m.NAME == was.NAME and m.shape == was.shape and m.nbytes == was.nbytes
        assert isinstance(m, interleaved.Matrix) == (expect and m.NAME == "q4_k"), m
        if isinstance(m, interleaved.Matrix):
            assert m.layout.name == "q4_k_x16" and m.native_type != m.GGML_TYPE == was.GGML_TYPE
            assert m.data.__array_interface__["data"][0] % mmap.PAGESIZE == 0  # pages of its own
            np.testing.assert_array_equal(m.file_order(), was.data)
    assert {m.NAME for m in regrouped.matrices()} == {"q4_k", "q6_k"}
    assert not isinstance(regrouped.embedding, interleaved.Matrix)  # lookups read the file
    prompt = np.random.default_rng(5).integers(0, 512, 40)
    for level in native.supported():
        native.select(level)
        a, b = regrouped.new_cache(), mapped.new_cache()
        la = regrouped.forward(prompt, a, all_logits=True)
        lb = mapped.forward(prompt, b, all_logits=True)
        np.testing.assert_array_equal(la.view(np.uint32), lb.view(np.uint32), err_msg=level)
        for t in (7, 9):  # decode rows
            np.testing.assert_array_equal(regrouped.forward([t], a), mapped.forward([t], b))


def test_the_regrouped_rows_pages_leave_the_process(tmp_path):
    """weights.interleaved hands the mapped file's pages under a regrouped matrix back: the process's
    file-backed resident memory falls by their size, and the bytes still read the same."""
    from llama2.weights.interleaved import _hand_back

    def rss_file():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile")) << 10

    data = np.random.default_rng(6).integers(0, 256, 48 << 20, dtype=np.uint8)
    path = tmp_path / "blob"
    data.tofile(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(buf, np.uint8)[1000:(40 << 20) + 1000].reshape(-1, 4096)
    assert int(view.sum(dtype=np.uint64)) > 0  # every page resident
    before = rss_file()
    _hand_back(view)
    after = rss_file()
    assert before - after > (39 << 20), (before, after)
    np.testing.assert_array_equal(view.reshape(-1), data[1000:(40 << 20) + 1000])
