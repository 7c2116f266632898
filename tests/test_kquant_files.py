"""GGUF files from llama.cpp's own quantizer (shared/assets/kquant): every tensor used as stored (a
view of the memory map, as many bytes as the file holds), and teacher-forced logits against
llama.cpp's on the same file (shared/golden/llamacpp_kquant_logits.npz)."""

import json
import mmap

import numpy as np
import pytest

from conftest import asset, golden
from llama2 import gguf, weights
from llama2.checkpoint import LAYER_MATRICES
from llama2.model import Transformer

FILES = ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]

# Bounds on |ours - llama.cpp| over all 24 x 512 teacher-forced logits (std about 8), per file,
# and the least number of the 24 positions whose argmax must agree. See docs/engine.md.
LOGIT_BOUND = {"f16": 0.1, "q8_0": 1.0, "q4_0": 1.0, "q4_1": 1.0, "q5_0": 1.0, "q5_1": 1.2,
               "q4_k_m": 1.8, "q5_k_m": 1.5, "q6_k": 1.5}
ARGMAX_AGREE = {"f16": 24, "q8_0": 22, "q4_0": 23, "q4_1": 22, "q5_0": 23, "q5_1": 22,
                "q4_k_m": 20, "q5_k_m": 20, "q6_k": 22}


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


@pytest.mark.parametrize("name", FILES)
def test_teacher_forced_logits_match_llama_cpp(name):
    ref = np.load(golden("llamacpp_kquant_logits.npz"))
    model = Transformer(gguf.load(asset(f"kquant/rand256-{name}.gguf")))
    logits = model.forward(ref["ids"], model.new_cache(), all_logits=True)
    theirs = ref[name]
    diff = np.abs(logits - theirs).max()
    agree = int((logits.argmax(axis=1) == theirs.argmax(axis=1)).sum())
    print(f"{name}: max |diff| {diff:.4f}, argmax agrees on {agree}/24")
    assert diff <= LOGIT_BOUND[name] and agree >= ARGMAX_AGREE[name], (diff, agree)
