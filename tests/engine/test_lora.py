"""LoRA adapters at inference, applied unmerged (llama2.lora, native/layer.c): an adapter's logits
equal its merge on a float base (`export --lora`) and the quantized base's own products plus
s B (A x) on Q8_0 / Q4_K_M GGUF files; rows with different adapters, or none, share a pass and each
gets its bits alone, at every level and thread count; scales scale and adapters sum; the prefix
index keeps each adapter's blocks apart; an adapter for another model gets one line."""

import dataclasses
import io
import json
import re

import numpy as np
import pytest

import forward_reference
from conftest import asset, random_adapter
from llama2 import Llama, native
from llama2.checkpoint import LAYER_MATRICES
from llama2.cli import main
from llama2.errors import FormatError
from llama2.formats import adapter as adapter_file

pytestmark = pytest.mark.usefixtures("restore_level")  # conftest.py

STORIES = "stories260K.gguf"  # with its own vocabulary
PROMPT = "Once upon a time, there was a little girl named Quilla. She"


def run_cli(argv):
    out, err = io.BytesIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err, stdin=io.StringIO(""))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A PEFT adapter (with its adapter.gguf) that `llama2 finetune` trained briefly on stories260K
    at a high rate, on stories whose Lily is renamed Quilla; and the base with it merged by
    `llama2 export --lora`, as GGUF."""
    pytest.importorskip("torch")  # training needs torch; the inference under test does not
    root = tmp_path_factory.mktemp("lora")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", asset("tinystories_valid_sample.txt").read_text())]
    named = [p.replace("Lily", "Quilla") for p in paragraphs if "Lily" in p][:200]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in named))
    code, err = run_cli(["finetune", asset(STORIES), "--data", root / "train.jsonl", "--out", root / "out",
                         "--num_threads", "1", "--seq-len", "64", "--batch_size", "4", "--max_iters", "8",
                         "--learning_rate", "1e-2", "--warmup_iters", "0", "--eval_iters", "0"])
    assert code == 0, err
    code, err = run_cli(["export", root / "merged.gguf", "--from", asset(STORIES), "--lora", root / "out",
                         "--format", "gguf"])
    assert code == 0, err
    return root / "out", root / "merged.gguf"


# The adapter against its merge, in the logits' scale: 2.5e-4, not 1e-5. The two agree within 1e-5
# of it until some position (13 of 22), then differ by up to 1.1e-4, and so does the merged model
# alone between two levels (AVX2 and AVX-512: 1.1e-4, while the unmerged pass moves 4e-6 between
# them): float32 rounding that this briefly, steeply trained adapter magnifies. A misapplied adapter
# is off by more than 1.0 (test_unmerged_equals_merged_on_a_float_base asserts it).
MERGE_BOUND = 2.5e-4


def close(ours, reference, bound=1e-5):
    """Within `bound` of the logits' scale: the merge rounds W + s B A once in float32, the
    unmerged pass rounds W x and s B (A x) apart; the two differ by float32 rounding through every
    layer."""
    return np.abs(ours - reference).max() < bound * np.abs(reference).max()


@pytest.mark.parametrize("form", ["peft", "gguf"])
def test_unmerged_equals_merged_on_a_float_base(finetuned, form):
    out, merged = finetuned
    source = out if form == "peft" else out / adapter_file.GGUF
    base, merged = Llama.load(asset(STORIES)), Llama.load(merged)
    ids = base.encode(PROMPT)
    assert np.abs(merged.logits(ids) - base.logits(ids)).max() > 1.0  # the adapter does change the model
    adapted = Llama.load(asset(STORIES), lora=source)
    # Every level, its own kernels (its f32 dot for the LoRA products), within MERGE_BOUND.
    for level in native.supported():
        native.select(level)
        ours, reference = adapted.logits(ids), merged.logits(ids)
        assert close(ours, reference, MERGE_BOUND), level


class LoRAMatrix:
    """A base matrix as forward_reference calls it, plus s B (A x) in numpy."""

    def __init__(self, matrix, a, b, s):
        self.matrix, self.a, self.b, self.s = matrix, a, b, np.float32(s)

    def __call__(self, x):  # [N, in] -> [N, out]
        return self.matrix(x) + self.s * ((x @ self.a.T) @ self.b.T)


def with_lora(model, lora):
    """`model` for forward_reference with each adapted matrix a LoRAMatrix."""
    layers = [dataclasses.replace(layer, **{name: LoRAMatrix(getattr(layer, name), *lora.pairs[name, l])
                                            for name in LAYER_MATRICES if (name, l) in lora.pairs})
              for l, layer in enumerate(model.layers)]
    shim = type("Adapted", (), {})()
    shim.__dict__.update(vars(model), layers=layers)
    return shim


@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])
def test_unmerged_on_a_quantized_base_adds_the_lora_to_its_own_products(kind, tmp_path):
    """A quantized base stays as stored (merging would requantize it): the reference is the pass
    step by step (tests/forward_reference.py) with the base's own products plus s B (A x) in numpy."""
    path = asset(f"kquant/rand256-{kind}.gguf")
    plain = Llama.load(path)
    folder = random_adapter(tmp_path / "ad", plain.config)
    ids = list(np.random.default_rng(1).integers(3, plain.config.vocab_size, 20))
    before = plain.logits(ids)
    for source in (folder, folder / adapter_file.GGUF):
        adapted = Llama.load(path, lora=source)
        model = adapted.model
        reference = forward_reference.forward_batch(with_lora(model, model.adapters[0]), [(0, ids)],
                                                    model.new_cache(), all_logits=True)
        ours = adapted.logits(ids)
        assert np.abs(ours - before).max() > 0.1 * np.abs(before).max()
        assert close(ours, reference), source


def alone(model, tokens, follow, adapter):
    """A prompt, then one decode row, in a cache of their own: both rows' logits."""
    cache = model.new_cache(1)
    first = model.forward(tokens, cache, all_logits=True, adapter=adapter)
    return first, model.forward([follow], cache, adapter=adapter)[-1]


def test_rows_with_different_adapters_share_a_pass_with_their_bits_alone(finetuned, tmp_path):
    """Two adapters and the base in one pass (prompts, then decode rows), at every level and at 1
    and 2 threads: each row's logits are bit for bit those it gets alone, and the base's rows
    those of a model without adapters (a pass without adapted rows runs the plain phases)."""
    out, _ = finetuned
    plain = Llama.load(asset(STORIES))
    llama = Llama.load(asset(STORIES), adapters={"ft": out, "rand": random_adapter(tmp_path / "r", plain.config)})
    model = llama.model
    assert model.adapter == -1 and [a.name for a in model.adapters] == ["ft", "rand"]
    prompts = [llama.encode(p) for p in (PROMPT, "Lily went to the park", "The dog ran", "Tom had")]
    adapters = [0, -1, 1, 0]
    for level in native.supported():
        native.select(level)
        for threads in (1, 2):
            native.set_threads(threads)
            cache = model.new_cache(len(prompts))
            firsts = model.forward_batch(list(enumerate(prompts)), cache, True, adapters)
            ends = np.cumsum([len(p) for p in prompts])
            follows = [int(firsts[e - 1].argmax()) for e in ends]
            seconds = model.forward_batch([(s, [t]) for s, t in enumerate(follows)], cache, False, adapters)
            for s, (p, a) in enumerate(zip(prompts, adapters)):
                first, second = alone(model, p, follows[s], a)
                assert np.array_equal(firsts[ends[s] - len(p):ends[s]], first), (level, threads, s)
                assert np.array_equal(seconds[s], second), (level, threads, s)
                if a < 0:
                    assert np.array_equal(first, alone(plain.model, p, follows[s], None)[0])
            assert not np.array_equal(firsts[:ends[0]], alone(model, prompts[0], follows[0], -1)[0])


def test_scales_scale_and_adapters_sum(finetuned):
    out, merged = finetuned
    base = Llama.load(asset(STORIES))
    ids = base.encode(PROMPT)
    # scale 0 adds 0 * B (A x) to every value: the base's bits
    assert np.array_equal(Llama.load(asset(STORIES), lora=[(out, 0.0)]).logits(ids), base.logits(ids))
    # two halves of the same adapter (PEFT's and GGUF's files) sum to it
    halves = Llama.load(asset(STORIES), lora=[(out, 0.5), (out / adapter_file.GGUF, 0.5)])
    assert close(halves.logits(ids), Llama.load(merged).logits(ids), MERGE_BOUND)
    assert halves.model.adapters[0].pairs["wq", 0][0].shape[0] == 2 * 8  # the ranks stacked (finetune's 8)


def test_the_prefix_index_keeps_each_adapter_s_blocks_apart(finetuned):
    out, _ = finetuned
    llama = Llama.load(asset(STORIES), adapters={"ft": out})
    model = llama.model
    tokens = llama.encode(PROMPT * 3)
    cache = model.new_cache(2)
    model.forward(tokens, cache, 0, adapter=0)
    cache.publish(0, tokens, cache.adapter_root(0))
    assert cache.reuse_prefix(1, tokens, cache.adapter_root(-1)) == 0  # the base's KV is other KV
    cache.reset(1)
    assert cache.reuse_prefix(1, tokens, cache.adapter_root(0)) > 0


def test_an_adapter_for_another_model_gets_one_line(tmp_path):
    other = random_adapter(tmp_path / "other", Llama.load(asset("kquant/rand256-q8_0.gguf")).config)
    for source in (other, other / adapter_file.GGUF):
        with pytest.raises(FormatError) as e:
            Llama.load(asset(STORIES), lora=source)
        message = str(e.value)
        assert "\n" not in message and str(source) in message, message
        assert "another model" in message or "does not fit this model" in message, message
    with pytest.raises(FormatError, match="not a LoRA adapter"):
        Llama.load(asset(STORIES), lora=tmp_path / "missing")


def test_the_plan_s_adapter_errors_are_one_line():
    """The native binding's own checks (llama2.lora and Transformer check before it)."""
    from llama2.formats import load_checkpoint
    from llama2.model import Transformer
    from test_forward import _plan_args

    model = Transformer(load_checkpoint(asset("stories260K.bin")))
    args = _plan_args(model)
    a, b = np.zeros((2, 64), np.float32), np.zeros((64, 2), np.float32)  # wq is [64, 64]: rank 2
    for adapters, message in [
        ([[(0, 0, a, np.zeros((63, 2), np.float32), 1.0)]], "adapter 0 layer 0 wq: A must be float32 \\[rank, 64\\], "
                                                             "B float32 \\[64, rank\\]"),
        ([[(0, 0, a.astype(np.float64), b, 1.0)]], "adapter 0 layer 0 wq: A must be float32"),
        ([[], [(5, 0, a, b, 1.0)]], "adapter 1 names layer 5 matrix 0; the plan has 5 layers"),
        ([[(0, 0, a, b, 1.0), (0, 0, a, b, 1.0)]], "adapter 0 names layer 0 wq twice"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            native.forward_plan(*args, adapters)
        assert "\n" not in str(e.value)
    plan = native.forward_plan(*args, [[(0, 0, a, b, 1.0)]])
    cache = model.new_cache(slots=1, blocks=1)
    cache.reserve(0, 1)
    x, logits = np.zeros((1, model.config.dim), np.float32), np.empty((1, model.config.vocab_size), np.float32)
    call = (plan, x, cache.pool.k, cache.pool.v, 0, np.zeros((1, 1), np.int32), np.array([0], np.int64),
            np.array([1], np.int64), logits)
    native.forward(*call, np.array([0], np.int32))  # the good call runs
    for adapter, message in [(np.array([1], np.int32), "row 0 names adapter 1; the plan has 1"),
                             (np.array([0, 0], np.int32), "adapter must be int32 \\[1\\]"),
                             (np.array([0], np.int64), "adapter must be int32 \\[1\\]")]:
        with pytest.raises(ValueError, match=message):
            native.forward(*call, adapter)
