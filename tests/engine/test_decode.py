"""The decode step in one native call (llama2.decode, native/layer.c) against the per-matrix path:
the same logits and the same cache bytes, bit for bit, for every weight type and KV type, several
sequences of different lengths (and a forked one) in a batch, at every instruction-set variant and
thread count."""

import io
import json
import platform
import threading

import numpy as np
import pytest

from conftest import GOLDEN, asset, random_weights
from llama2 import checkpoint, kernels as K, kvcache, native
from llama2.config import ModelConfig
from llama2.decode import Plan
from llama2.formats import load_checkpoint
from llama2.model import Transformer
from llama2.weights import bf16

VARIANTS = native.variants()
F32 = np.float32
KV_TYPES = tuple(kvcache.TYPES)
KQUANT = ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")


@pytest.fixture(autouse=True)
def _restore_level():
    before, threads = native.variant(), native._native.threads()
    yield
    native.select_variant(before)
    native.set_threads(threads)


# -- models ---------------------------------------------------------------------------------------

SMALL = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, seq_len=80,
                    shared_classifier=False, rope_style="halves")


def _bf16(a):  # float32 [out, in] -> bf16 Matrix (round to nearest even)
    bits = np.ascontiguousarray(a, dtype=F32).view(np.uint32)
    return bf16.Matrix(((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
                       .astype(np.uint16))


def _random(kind):
    w = random_weights(SMALL, seed=11)
    if kind == "bf16":
        for name in checkpoint.LAYER_MATRICES:
            w[name] = [_bf16(m) for m in w[name]]
        w["wcls"] = _bf16(w["wcls"])
    ckpt = checkpoint.Checkpoint(SMALL, w, 1, "<memory>")
    return ckpt, {"int8_rows": dict(quantize="q8_0", group_size=32)}.get(kind, {})


MODELS = {  # name -> () -> (checkpoint, Transformer kwargs)
    "stories260K-f32": lambda: (load_checkpoint(asset("stories260K.bin")), {}),  # GQA 8/4, head 8
    "stories260K-q8-any-layout": lambda: (load_checkpoint(asset("stories260K-q8.bin")), {}),
    "rand-gqa-unshared": lambda: (load_checkpoint(asset("rand-gqa-unshared.bin")), {}),
    "random-bf16-mqa-halves": lambda: _random("bf16"),
    "random-int8-rows-mqa-halves": lambda: _random("int8_rows"),
    **{f"gguf-{t}": (lambda t=t: (load_checkpoint(asset(f"kquant/rand256-{t}.gguf")), {})) for t in KQUANT},
}


def _pair(name, kv_type):
    """(per-matrix model, one-call model) of one checkpoint, or skip if the KV type cannot hold it."""
    ckpt, kw = MODELS[name]()
    if not kvcache.TYPES[kv_type].holds(ckpt.config.head_dim):
        pytest.skip(f"{kv_type} KV needs {kvcache.TYPES[kv_type].needs}")
    ref = Transformer(ckpt, kv_type=kv_type, **kw)
    ref.fused_decode = False
    return ref, Transformer(ckpt, kv_type=kv_type, **kw)


def _session(model):
    """Prompts of 4, 2, 17 (past a block), 3 and 1 tokens, a forked sequence sharing slot 0's blocks,
    then decode passes over different sets of sequences -> (logits of every decode pass, k, v)."""
    V = model.config.vocab_size
    rng = np.random.default_rng(5)
    cache = model.new_cache(slots=6, seq_len=64)
    lens = {0: 4, 1: 2, 2: 17, 3: 3, 4: 1}  # one prompt pass below tile_rows: native products
    model.forward_batch([(s, rng.integers(0, V, n)) for s, n in lens.items() if s != 4], cache)
    model.forward_batch([(4, [1])], cache)
    cache.fork(0, 5)  # slot 5 continues slot 0: its first decode copies the shared last block
    out = []
    groups = [[0, 1, 2, 3, 4, 5], [2], [5, 0], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    for step in range(8):
        group = groups[step % len(groups)]
        out.append(model.forward_batch([(s, [int(rng.integers(0, V))]) for s in group], cache))
    cache.check()
    return out, cache.pool.k.copy(), cache.pool.v.copy()


def _assert_same(ref, fused):
    a, b = _session(ref), _session(fused)
    assert isinstance(fused._plan, Plan), "the one-call decode step did not run"
    assert ref._plan is False
    for x, y in zip(a[0], b[0]):
        assert x.dtype == y.dtype == F32
        assert x.tobytes() == y.tobytes()
    assert a[1].tobytes() == b[1].tobytes() and a[2].tobytes() == b[2].tobytes()


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("name", MODELS)
def test_one_call_equals_per_matrix_path(name, kv_type):
    native.set_threads(2)
    _assert_same(*_pair(name, kv_type))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_one_call_equals_per_matrix_path_at_every_level(name, variant, threads):
    native.select_variant(variant)
    native.set_threads(threads)
    kv = KV_TYPES[(len(name) + VARIANTS.index(variant) + threads) % len(KV_TYPES)]  # each KV type somewhere
    if "stories260K" in name or "gguf-q4" in name:
        kv = "q8_0" if threads == 1 else kv  # the encoder of every type at every level
    _assert_same(*_pair(name, kv))


def test_passes_beyond_invariant_rows_take_the_per_matrix_path(monkeypatch):
    # int8 in groups of 8 (rows straddle groups): 8 rows on the native kernel, more on tiles + BLAS
    ckpt = load_checkpoint(asset("stories260K-q8.bin"))
    model = Transformer(ckpt)
    assert model.invariant_rows == 8
    calls = []
    real = Plan.__call__
    monkeypatch.setattr(Plan, "__call__", lambda self, x, *a: calls.append(len(x)) or real(self, x, *a))
    cache = model.new_cache(slots=9)
    model.forward_batch([(s, [1]) for s in range(9)], cache)
    model.forward_batch([(s, [2]) for s in range(8)], cache)
    model.forward_batch([(0, [3, 4])], cache)
    assert calls == [8] and model._plan.rows == 8


def test_concurrent_passes_share_the_pool():
    """Two threads decoding at once: one finds the pool busy and runs alone; both get their bits."""
    native.set_threads(2)
    ckpt = load_checkpoint(asset("rand-gqa-unshared.bin"))
    want = _session(Transformer(ckpt))
    got = [None, None]

    def run(i):
        got[i] = _session(Transformer(ckpt))

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


def test_plan_exists_exactly_where_numpy_sums_in_that_order():
    """On x86-64 numpy's einsum sums in the order above (kernels.rmsnorm's bits), and the model gets
    its plan; a numpy that sums otherwise keeps the per-matrix path (never different bits)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 288)).astype(F32)
    w = np.ones(288, F32)
    same = K.rmsnorm(x, w, 1e-5).tobytes() == einsum_order_rmsnorm(x, w, 1e-5).tobytes()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert same
    model = Transformer(load_checkpoint(asset("stories260K.bin")))
    assert (Plan.build(model) is not None) == same


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
    plan = native.decode_plan(*args)
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
    ]
    for edit, message in bad_plans:
        a = list(args)
        edit(a)
        with pytest.raises(ValueError, match=message) as e:
            native.decode_plan(*a)
        assert "\n" not in str(e.value)

    cache = model.new_cache(slots=2, blocks=4)
    cache.reserve(0, 1)
    k, v = cache.pool.k, cache.pool.v
    x, lens, logits = np.zeros((1, c.dim), F32), np.array([1], np.int64), np.empty((1, c.vocab_size), F32)
    tables = np.zeros((1, 1), np.int32)
    native.decode_forward(plan, x.copy(), k, v, 0, tables, lens, logits)  # the good call runs
    bad_calls = [
        ((plan, np.zeros((1, 63), F32), k, v, 0, tables, lens, logits), ValueError, "x must be float32 \\[B, 64\\]"),
        ((plan, x, k, v, 7, tables, lens, logits), ValueError, "KV type 7 cannot hold"),
        ((plan, x, k, v, 1, tables, lens, logits), ValueError, "k_pool and v_pool must be uint8"),
        ((plan, x, k, v[:, :2].copy(), 0, tables, lens, logits), ValueError, "k_pool and v_pool"),
        ((plan, x, k, v[:, :2], 0, tables, lens, logits), ValueError, "v_pool must be a C-contiguous writable"),
        ((plan, x, k, v, 0, np.array([[4]], np.int32), lens, logits), IndexError, "names block 4 of a pool of 4"),
        ((plan, x, k, v, 0, tables, np.array([17], np.int64), logits), ValueError, "attends 17 positions"),
        ((plan, x, k, v, 0, tables, np.array([0], np.int64), logits), ValueError, "attends 0 positions"),
        ((plan, x, k, v, 0, tables.astype(np.int64), lens, logits), ValueError, "tables must be int32"),
        ((plan, x, k, v, 0, tables, lens, np.empty((1, 5), F32)), ValueError, "logits must be float32 \\[1, 512\\]"),
        ((object(), x, k, v, 0, tables, lens, logits), (ValueError, TypeError), "capsule|PyCapsule"),
    ]
    for call, kind, message in bad_calls:
        with pytest.raises(kind, match=message) as e:
            native.decode_forward(*call)
        assert "\n" not in str(e.value)


# -- run.c's goldens through the one-call step ---------------------------------------------------

def _golden_cases():
    path = GOLDEN / "runc.jsonl"
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} not found (set LLAMA2_GOLDEN)"))]
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [pytest.param(c, id=f"{i}-{c['model']}") for i, c in enumerate(cases)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", _golden_cases())
def test_runc_goldens_at_every_level_and_thread_count(case, variant, threads, monkeypatch, tmp_path):
    """Every run.c golden byte for byte with each decode step in one native call, at every
    compiled variant and at one and two threads."""
    from llama2.cli import main

    native.select_variant(variant)
    built = []
    real_build = Plan.build
    monkeypatch.setattr(Plan, "build", classmethod(lambda cls, m: built.append(real_build(m)) or built[-1]))
    monkeypatch.chdir(tmp_path)
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset(case["model"])), "-z", str(asset(case["tokenizer"])), *case["args"],
                 "--threads", str(threads)], stdout=out, stderr=err, stdin=io.StringIO(""))
    assert code == 0, err.getvalue()
    assert out.getvalue() == bytes.fromhex(case["stdout_hex"])
    assert built and all(isinstance(p, Plan) for p in built)  # the decode steps ran in one call
