"""The forward pass in one native call (llama2.plan, native/layer.c) against the step-by-step Python
reference (tests/forward_reference.py: each product one row of Matrix(x), numpy's RMSNorm, the
cache's own write, native.attention): the same logits and the same cache bytes, bit for bit, for
every weight type and KV type, prompts and decode rows of several sequences of different lengths
(and a forked one) in a pass, at every instruction-set variant and thread count."""

import io
import threading

import numpy as np
import pytest

import forward_reference
from conftest import asset, golden_cases, mixed_kernels, random_weights
from llama2 import checkpoint, kvcache, native
from llama2.config import ModelConfig
from llama2.formats import load_checkpoint
from llama2.model import Transformer
from llama2.weights import bf16

VARIANTS = native.variants()
F32 = np.float32
KV_TYPES = tuple(kvcache.TYPES)
KQUANT = ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")


pytestmark = pytest.mark.usefixtures("restore_level")  # conftest.py


# -- models ---------------------------------------------------------------------------------------

SMALL = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, seq_len=80,
                    shared_classifier=False, rope_style="halves")


def _bf16(a):  # float32 [out, in] -> bf16 Matrix (round to nearest even)
    bits = np.ascontiguousarray(a, dtype=F32).view(np.uint32)
    return bf16.Matrix(((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
                       .astype(np.uint16))


# Heads wider than dim / n_heads (q and the attention output 128 wide, the model 64) and a sliding
# window shorter than the session's prompts, so the cache frees blocks the rows no longer attend.
WIDE_WINDOW = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=80,
                          shared_classifier=False, explicit_head_dim=32, sliding_window=6)


def _random(kind, config=SMALL):
    w = random_weights(config, seed=11)
    if kind == "bf16":
        for name in checkpoint.LAYER_MATRICES:
            w[name] = [_bf16(m) for m in w[name]]
        w["wcls"] = _bf16(w["wcls"])
    ckpt = checkpoint.Checkpoint(config, w, 1, "<memory>")
    return ckpt, {"int8_rows": dict(quantize="q8_0", group_size=32), "q4_0": dict(quantize="q4_0")}.get(kind, {})


MODELS = {  # name -> () -> (checkpoint, Transformer kwargs)
    "stories260K-f32": lambda: (load_checkpoint(asset("stories260K.bin")), {}),  # GQA 8/4, head 8
    "stories260K-q8-any-layout": lambda: (load_checkpoint(asset("stories260K-q8.bin")), {}),
    "rand-gqa-unshared": lambda: (load_checkpoint(asset("rand-gqa-unshared.bin")), {}),
    "random-bf16-mqa-halves": lambda: _random("bf16"),
    "random-int8-rows-mqa-halves": lambda: _random("int8_rows"),
    "random-wide-heads-window": lambda: _random("f32", WIDE_WINDOW),
    "random-wide-heads-window-q4_0": lambda: _random("q4_0", WIDE_WINDOW),  # wo's Q8_0 activations at q's width
    **{f"gguf-{t}": (lambda t=t: (load_checkpoint(asset(f"kquant/rand256-{t}.gguf")), {})) for t in KQUANT},
}


def _model(name, kv_type):
    """A Transformer of one checkpoint, or skip if the KV type cannot hold it."""
    ckpt, kw = MODELS[name]()
    if not kvcache.TYPES[kv_type].holds(ckpt.config.head_dim):
        pytest.skip(f"{kv_type} KV needs {kvcache.TYPES[kv_type].needs}")
    return Transformer(ckpt, kv_type=kv_type, **kw)


def reference_pass(model, segments, cache, all_logits):
    return forward_reference.forward_batch(model, segments, cache, all_logits)


def _session(model, forward):
    """Prompts of 4, 2, 17 (past a block and past 8 rows), 3 and 1 tokens in two passes, a forked
    sequence sharing slot 0's blocks, then decode passes over different sets of sequences, one with a
    prompt beside them -> (logits of every pass, k, v)."""
    V = model.config.vocab_size
    rng = np.random.default_rng(5)
    cache = model.new_cache(slots=6, seq_len=64)
    lens = {0: 4, 1: 2, 2: 17, 3: 3}
    out = [forward(model, [(s, rng.integers(0, V, n)) for s, n in lens.items()], cache, True)]
    out.append(forward(model, [(4, [1])], cache, False))
    cache.fork(0, 5)  # slot 5 continues slot 0: its first decode copies the shared last block
    groups = [[0, 1, 2, 3, 4, 5], [2], [5, 0], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    for step in range(8):
        segments = [(s, [int(rng.integers(0, V))]) for s in groups[step % len(groups)]]
        if step == 3:
            segments.append((0, rng.integers(0, V, 5)))  # a prompt continuing slot 0 beside decode rows
        out.append(forward(model, segments, cache, step == 3))
    cache.check()
    if model.config.sliding_window:  # blocks out of the window went back to the pool, their entries gone
        assert any(b is None for table in cache.tables for b in table)
    return out, cache.pool.k.copy(), cache.pool.v.copy()


def _native_pass(model, segments, cache, all_logits):
    return model.forward_batch(segments, cache, all_logits)


def _assert_same(model):
    a, b = _session(model, reference_pass), _session(model, _native_pass)
    for x, y in zip(a[0], b[0]):
        assert x.dtype == y.dtype == F32 and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
    assert a[1].tobytes() == b[1].tobytes() and a[2].tobytes() == b[2].tobytes()


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("name", MODELS)
def test_one_call_equals_the_reference(name, kv_type):
    native.set_threads(2)
    _assert_same(_model(name, kv_type))


@pytest.mark.slow  # every instruction-set level x thread count: the full run's
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_one_call_equals_the_reference_at_every_level(name, variant, threads):
    native.select_variant(variant)
    native.set_threads(threads)
    kv = KV_TYPES[(len(name) + VARIANTS.index(variant) + threads) % len(KV_TYPES)]  # each KV type somewhere
    if "stories260K" in name or "gguf-q4" in name:
        kv = "q8_0" if threads == 1 else kv  # the encoder of every type at every level
    _assert_same(_model(name, kv))


@pytest.mark.parametrize("name", MODELS)
def test_one_call_equals_the_reference_with_mixed_levels(name):
    """Each weight type on its own variant (conftest.mixed_kernels): prompts and decode rows of a
    pass still get the reference's bits."""
    native.select_kernels(mixed_kernels())
    native.set_threads(2)
    _assert_same(_model(name, KV_TYPES[len(name) % len(KV_TYPES)]))


def test_concurrent_passes_share_the_pool():
    """Two threads running passes at once: one finds the pool busy and runs alone; both get their
    bits."""
    native.set_threads(2)
    ckpt = load_checkpoint(asset("rand-gqa-unshared.bin"))
    want = _session(Transformer(ckpt), _native_pass)
    got = [None, None]

    def run(i):
        got[i] = _session(Transformer(ckpt), _native_pass)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for g in got:
        assert all(x.tobytes() == y.tobytes() for x, y in zip(g[0], want[0]))
        assert g[1].tobytes() == want[1].tobytes()


# -- RMSNorm in numpy's order -------------------------------------------------------------------

def einsum_order_rmsnorm(x, w, eps):
    """The sum of squares as numpy's einsum ("td,td->t") adds it on x86-64, one float32 operation
    at a time: four lanes, sixteen values a step (lane l takes x[i+12+l], x[i+8+l], x[i+4+l],
    x[i+l] in that order, each square rounded before its add), then the tail four values a step,
    then (l0 + l1) + (l2 + l3)."""
    n, d = x.shape
    acc = np.zeros((n, 4), F32)
    i = 0
    while i + 16 <= d:
        for k in (3, 2, 1, 0):
            a = x[:, i + 4 * k:i + 4 * k + 4]
            acc = a * a + acc
        i += 16
    while i < d:
        a = np.zeros((n, 4), F32)
        a[:, :min(4, d - i)] = x[:, i:i + 4]
        acc = a * a + acc
        i += 4
    ss = (acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])
    inv = F32(1.0) / np.sqrt(ss / F32(d) + F32(eps), dtype=F32)
    return w * (x * inv[:, None])


@pytest.mark.parametrize("d", [1, 3, 4, 15, 16, 17, 31, 64, 172, 288, 300, 4096])
def test_rmsnorm_einsum_follows_numpy_einsum_order(d):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * F32([[1e-3], [1], [3], [50], [1e4]])).astype(F32)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(F32)
    got = native.rmsnorm_einsum(x, w, 1e-5, np.empty_like(x))
    assert got.tobytes() == einsum_order_rmsnorm(x, w, 1e-5).tobytes()
    assert native.rmsnorm_einsum(x, w, 1e-5, x) is x and x.tobytes() == got.tobytes()  # in place


# -- bad input ------------------------------------------------------------------------------------

def _plan_args(model):
    c = model.config
    layers = [(l.rms_att, l.rms_ffn, *[m.native_product() for m in l.matrices()]) for l in model.layers]
    return [(c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.norm_eps, False), layers, model.rms_final,
            model.classifier.native_product(), model.cos, model.sin]


def test_plan_and_call_errors_are_one_line():
    model = Transformer(load_checkpoint(asset("stories260K.bin")))
    c = model.config
    args = _plan_args(model)
    plan = native.forward_plan(*args)
    bad_plans = [
        (lambda a: a.__setitem__(2, np.ones(7, F32)), "rms_final must be float32 \\[64\\]"),
        (lambda a: a.__setitem__(0, (8, 3, 172, 512, 1e-5, False)), "heads over 3 kv heads"),
        (lambda a: a.__setitem__(3, ("type", 0, np.ones((512, 63), F32))), "classifier must be F32 \\[512, 64\\]"),
        (lambda a: a.__setitem__(3, ("type", 5, np.ones((512, 64), F32))), "ggml type 5 is not"),
        (lambda a: a.__setitem__(3, ("nope", 1, 2)), "unknown product spec nope"),
        (lambda a: a.__setitem__(1, [a[1][0][:5]]), "layer 0 must be a tuple of 9 items"),
        (lambda a: a.__setitem__(3, ("int8_rows", np.zeros((512, 64), np.int8), np.ones(1024, F32), 48)),
         "group size 48 does not fit int8_rows"),
        (lambda a: a.__setitem__(3, ("int8_flat", np.zeros((512, 64), np.int8), np.ones(3, F32), 8)),
         "at least 4096 scales"),
        (lambda a: a.__setitem__(0, (8, 4, 172, 512, 1e-5, False, -1)), "window and dim must be >= 0"),
        (lambda a: a.__setitem__(0, (8, 4, 172, 512, 1e-5, False, 0, 65)), "layer 0 rms_att must be float32 \\[65\\]"),
    ]
    for edit, message in bad_plans:
        a = list(args)
        edit(a)
        with pytest.raises(ValueError, match=message) as e:
            native.forward_plan(*a)
        assert "\n" not in str(e.value)

    cache = model.new_cache(slots=2, blocks=4)
    cache.reserve(0, 1)
    k, v = cache.pool.k, cache.pool.v
    x, logits = np.zeros((1, c.dim), F32), np.empty((1, c.vocab_size), F32)
    tables, starts, counts = np.zeros((1, 1), np.int32), np.array([0], np.int64), np.array([1], np.int64)
    native.forward(plan, x.copy(), k, v, 0, tables, starts, counts, logits)  # the good call runs
    good = (plan, x, k, v, 0, tables, starts, counts, logits)

    def call(**edits):  # the good call with some arguments replaced
        names = ("plan", "x", "k", "v", "kv", "tables", "starts", "counts", "logits")
        return tuple(edits.get(n, a) for n, a in zip(names, good))

    bad_calls = [
        (call(x=np.zeros((1, 63), F32)), ValueError, "x must be float32 \\[N, 64\\]"),
        (call(kv=7), ValueError, "KV type 7 cannot hold"),
        (call(kv=1), ValueError, "k_pool and v_pool must be uint8"),
        (call(v=v[:, :2].copy()), ValueError, "k_pool and v_pool"),
        (call(v=v[:, :2]), ValueError, "v_pool must be a C-contiguous writable"),
        (call(tables=np.array([[4]], np.int32)), IndexError, "segment 0 names block 4 of a pool of 4"),
        (call(counts=np.array([17], np.int64)), ValueError,
         "holds positions 0..16; its table and the RoPE tables hold 0..15"),
        (call(starts=np.array([16], np.int64)), ValueError, "holds positions 16..16"),
        (call(counts=np.array([0], np.int64)), ValueError, "holds positions 0..-1"),
        (call(starts=np.array([-1], np.int64)), ValueError, "holds positions -1..-1"),
        (call(x=np.zeros((2, c.dim), F32), logits=np.empty((2, c.vocab_size), F32)), ValueError,
         "the segments hold 1 rows; x has 2"),
        (call(tables=tables.astype(np.int64)), ValueError, "tables must be int32"),
        (call(counts=np.array([1, 1], np.int64)), ValueError, "counts must be int64 \\[1\\]"),
        (call(logits=np.empty((1, 5), F32)), ValueError, "logits must be float32 \\[1 or 1, 512\\]"),
        (call(plan=object()), (ValueError, TypeError), "capsule|PyCapsule"),
    ]
    for args, kind, message in bad_calls:
        with pytest.raises(kind, match=message) as e:
            native.forward(*args)
        assert "\n" not in str(e.value)


def test_blocks_out_of_the_window_are_neither_checked_nor_read():
    """With a window of 4, a row at position 20 attends 17..20: block 0 of its table (positions 0..15)
    may have been freed (-1 here) and is not checked; without the window it is refused."""
    model = Transformer(load_checkpoint(asset("stories260K.bin")))
    c = model.config
    args = _plan_args(model)
    windowed = native.forward_plan((*args[0], 4), *args[1:])
    cache = model.new_cache(slots=1, blocks=4)
    cache.reserve(0, 21)
    k, v = cache.pool.k, cache.pool.v
    x, logits = np.ones((1, c.dim), F32), np.empty((1, c.vocab_size), F32)
    tables = np.array([[-1, cache.tables[0][1]]], np.int32)
    starts, counts = np.array([20], np.int64), np.array([1], np.int64)
    native.forward(windowed, x.copy(), k, v, 0, tables, starts, counts, logits)
    assert np.isfinite(logits).all()
    # what block 0 would hold does not matter: a free block of 0xFF bytes (NaN) there gives the same bits
    spare = next(b for b in range(4) if b not in cache.tables[0])
    k[:, spare], v[:, spare] = 0xFF, 0xFF
    again = np.empty_like(logits)
    native.forward(windowed, x.copy(), k, v, 0, np.array([[spare, tables[0, 1]]], np.int32), starts, counts, again)
    assert again.tobytes() == logits.tobytes()
    with pytest.raises(IndexError, match="segment 0 names block -1 of a pool of 4"):
        native.forward(native.forward_plan(*args), x.copy(), k, v, 0, tables, starts, counts, logits)
    # and the same through native.attention, the per-layer entry to the same attention pass
    q, out = np.ones((1, c.n_heads, c.head_dim), F32), np.empty((1, c.q_dim), F32)
    native.attention(0, q, k[0], v[0], tables, starts, counts, out, 4)
    with pytest.raises(IndexError, match="segment 0 names block -1"):
        native.attention(0, q, k[0], v[0], tables, starts, counts, out)


# -- run.c's goldens at every level ----------------------------------------------------------------

@pytest.mark.slow  # every instruction-set level x thread count: the full run's
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS + ("mixed",))
@pytest.mark.parametrize("case", golden_cases("runc.jsonl"))
def test_runc_goldens_at_every_level_and_thread_count(case, variant, threads, monkeypatch, tmp_path):
    """Every run.c golden byte for byte (prompts and decode steps, each pass one native call), at
    every compiled variant, with each weight type on another variant (mixed), and at one and two
    threads."""
    from llama2.cli import main

    native.select_kernels(mixed_kernels()) if variant == "mixed" else native.select_variant(variant)
    monkeypatch.chdir(tmp_path)
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset(case["model"])), "-z", str(asset(case["tokenizer"])), *case["args"],
                 "--threads", str(threads)], stdout=out, stderr=err, stdin=io.StringIO(""))
    assert code == 0, err.getvalue()
    assert out.getvalue() == bytes.fromhex(case["stdout_hex"])
