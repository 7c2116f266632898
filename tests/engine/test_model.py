"""The forward pass: kernels, KV cache, batching, against a plain per-token reference of run.c."""

import numpy as np
import pytest

from conftest import TINY, random_weights
import forward_reference as R
from llama2 import checkpoint, rope
from llama2.config import ModelConfig
from llama2.model import Transformer


def _rope_tables(head_dim, seq_len, theta):  # unscaled RoPE tables of a head size (llama2.rope)
    return rope.tables(ModelConfig(dim=head_dim, hidden_dim=1, n_layers=1, n_heads=1, n_kv_heads=1,
                                   vocab_size=1, seq_len=seq_len, rope_theta=theta))


def reference_forward(w, c: ModelConfig, tokens):
    """run.c's forward, one token and one head at a time, in float64: the slow obvious version."""
    hd, g = c.head_dim, c.n_heads // c.n_kv_heads
    kcache, vcache, out = [[] for _ in range(c.n_layers)], [[] for _ in range(c.n_layers)], []

    def rms(x, wt):
        return wt * x / np.sqrt(np.mean(x * x) + c.norm_eps)

    def rot(vec, pos):
        vec = vec.copy()
        for i in range(0, len(vec), 2):
            freq = 1.0 / c.rope_theta ** ((i % hd) / hd)
            cr, ci = np.cos(pos * freq), np.sin(pos * freq)
            vec[i], vec[i + 1] = vec[i] * cr - vec[i + 1] * ci, vec[i] * ci + vec[i + 1] * cr
        return vec

    for pos, tok in enumerate(tokens):
        x = w["token_embedding"][tok].astype(np.float64)
        for l in range(c.n_layers):
            h = rms(x, w["rms_att"][l])
            q, k, v = rot(w["wq"][l] @ h, pos), rot(w["wk"][l] @ h, pos), w["wv"][l] @ h
            kcache[l].append(k)
            vcache[l].append(v)
            att = np.zeros(c.dim)
            for head in range(c.n_heads):
                kv = head // g
                qh = q[head * hd:(head + 1) * hd]
                scores = np.array([qh @ kt[kv * hd:(kv + 1) * hd] for kt in kcache[l]]) / np.sqrt(hd)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att[head * hd:(head + 1) * hd] = sum(pi * vt[kv * hd:(kv + 1) * hd]
                                                     for pi, vt in zip(p, vcache[l]))
            x = x + w["wo"][l] @ att
            h = rms(x, w["rms_ffn"][l])
            a, b = w["w1"][l] @ h, w["w3"][l] @ h
            x = x + w["w2"][l] @ (a / (1 + np.exp(-a)) * b)
        cls = w["token_embedding"] if c.shared_classifier else w["wcls"]
        out.append(cls @ rms(x, w["rms_final"]))
    return np.array(out)


def make(config, seed=0):
    w = random_weights(config, seed)
    return w, Transformer(checkpoint.Checkpoint(config, w, 1, "<memory>"))


@pytest.mark.parametrize("config", [
    TINY,
    ModelConfig(dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=300, seq_len=32,
                shared_classifier=False, rope_theta=1e6),
])
def test_matches_reference(config):
    w, model = make(config)
    tokens = [1, 5, 77, 3, 200, 9, 41, 299 % config.vocab_size]
    got = model.forward(tokens, model.new_cache(), all_logits=True)
    np.testing.assert_allclose(got, reference_forward(w, config, tokens), atol=1e-4, rtol=1e-4)


def test_rope_at_position_zero_is_identity():
    cos, sin = _rope_tables(8, 4, 10000.0)
    x = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(R.rope(x, cos[:1], sin[:1]), x)


def test_kv_cache_decode_equals_teacher_forced():
    _, model = make(TINY)
    tokens = [1, 17, 4, 250, 33, 8, 100, 2]
    full = model.forward(tokens, model.new_cache(), all_logits=True)
    cache = model.new_cache()
    model.forward(tokens[:3], cache)  # a prefill, then one token at a time
    steps = [model.forward([t], cache)[0] for t in tokens[3:]]
    np.testing.assert_allclose(np.array(steps), full[3:], atol=1e-5)
    assert cache.pos[0] == len(tokens)


def test_batched_sequences_are_independent():
    _, model = make(TINY)
    seqs = [[1, 5, 9], [1, 200], [1, 7, 7, 7, 300]]
    alone = [model.forward(s, model.new_cache())[0] for s in seqs]
    cache = model.new_cache(slots=3)
    together = model.forward_batch(list(enumerate(seqs)), cache)
    np.testing.assert_allclose(together, np.array(alone), atol=1e-5)
    # then one decode step for all three at once equals each alone
    nxt = model.forward_batch([(0, [4]), (1, [5]), (2, [6])], cache)
    for i, (s, t) in enumerate(zip(seqs, [4, 5, 6])):
        ref = model.forward(s + [t], model.new_cache())[0]
        np.testing.assert_allclose(nxt[i], ref, atol=1e-5)


def test_context_full_is_a_clear_error():
    from llama2.errors import Llama2Error
    _, model = make(TINY)
    cache = model.new_cache()
    model.forward(list(range(1, TINY.seq_len + 1)), cache)
    with pytest.raises(Llama2Error, match="context is full"):
        model.forward([1], cache)


def test_no_float64_in_outputs():
    _, model = make(TINY)
    assert model.forward([1, 2, 3], model.new_cache()).dtype == np.float32


def test_rope_halves_is_interleaved_rope_on_permuted_heads():
    # HF keeps each head's pairs as (i, i + hd/2); rotating that layout equals rotating the
    # interleaved layout and permuting the result the same way.
    from llama2.formats.hf import permute
    cos, sin = _rope_tables(8, 16, 10000.0)
    x = np.random.default_rng(3).standard_normal((4, 3, 8)).astype(np.float32)
    pos = np.array([0, 1, 9, 15])

    def to_halves(a):  # [T, H, 8] interleaved -> halves, per head (hf.permute on rows)
        return np.stack([permute(t.reshape(-1, 1), 3).reshape(3, 8) for t in a])

    np.testing.assert_allclose(R.rope(to_halves(x), cos[pos], sin[pos], "halves"),
                               to_halves(R.rope(x, cos[pos], sin[pos])), rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("tile", [1 << 22, 200])  # one tile, or several column blocks of the product
def test_int8_prefill_product_equals_dequantized(monkeypatch, tile):
    from llama2.formats.llama2c import quantize_q80
    from llama2.weights import base, int8_groups
    monkeypatch.setattr(base, "DEQUANT_TILE", tile)
    rng = np.random.default_rng(6)
    qt = quantize_q80(rng.standard_normal((37, 30)).astype(np.float32), 8)  # rows straddle groups
    x = rng.standard_normal((int8_groups.SMALL_BATCH + 5, 30)).astype(np.float32)  # past the native rows: tiles
    np.testing.assert_allclose(qt(x), x @ qt.dequantize().T, rtol=1e-5, atol=1e-5)
    ids = [36, 0, 5]
    np.testing.assert_array_equal(qt.rows(ids), qt.dequantize()[ids])


@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_prompt_paths_agree_with_decoding_token_by_token(quantize):
    # Prompts of 3 rows (gemm kernels from three rows on), 8 and 12 (past a dot call's tile and
    # int8's small-batch rows) equal feeding the tokens one at a time, bit for bit.
    SMALL_BATCH = 8
    w = random_weights(TINY, 3)
    model = Transformer(checkpoint.Checkpoint(TINY, w, 1, "<memory>"), quantize=quantize)
    tokens = list(np.random.default_rng(8).integers(0, TINY.vocab_size, SMALL_BATCH + 4))
    one = model.new_cache()
    steps = np.concatenate([model.forward([t], one) for t in tokens])
    for n in (3, SMALL_BATCH, SMALL_BATCH + 4):
        cache = model.new_cache()
        assert model.forward(tokens[:n], cache, all_logits=True).tobytes() == steps[:n].tobytes()


def test_warm_up_leaves_results_unchanged():
    w, model = make(TINY)
    cache = model.new_cache()
    before = model.forward([1, 2, 3], cache)
    model.warm_up()
    cache.reset()
    np.testing.assert_array_equal(model.forward([1, 2, 3], cache), before)


def test_short_int8_prompts_return_each_segments_last_logits():
    # Every pass returns one row per segment (its last token) unless all logits are asked for.
    w = random_weights(TINY, 4)
    model = Transformer(checkpoint.Checkpoint(TINY, w, 1, "<memory>"), quantize="q8_0")
    segments = [(0, [5, 6, 7]), (1, [8, 9])]
    full = model.forward_batch(segments, model.new_cache(2), all_logits=True)
    last = model.forward_batch(segments, model.new_cache(2))
    np.testing.assert_array_equal(last, full[[2, 4]])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_prompt_logits_equal_decoding_one_token_at_a_time_bit_for_bit(quantize, kv_type):
    # Each row's attention has a decode row's arithmetic, and a pass of any number of rows gives
    # each row its own products' bits: a prompt (from position 0, or continuing a cached sequence,
    # or beside another sequence's prompt in one pass) gives exactly the logits of feeding its
    # tokens one at a time.
    w = random_weights(TINY, 5)
    model = Transformer(checkpoint.Checkpoint(TINY, w, 1, "<memory>"), quantize=quantize, kv_type=kv_type)
    n = 20  # past a block of the cache; 2n within TINY's context
    rng = np.random.default_rng(9)
    a, b = (list(rng.integers(0, TINY.vocab_size, size)) for size in (2 * n, n))
    steps = {}
    for name, tokens in (("a", a), ("b", b)):
        cache = model.new_cache()
        steps[name] = np.concatenate([model.forward([t], cache) for t in tokens])
    cache = model.new_cache(slots=2)
    first = model.forward(a[:n], cache, all_logits=True)  # from position 0
    second = model.forward(a[n:], cache, all_logits=True)  # continuing the cached sequence
    assert first.tobytes() == steps["a"][:n].tobytes() and second.tobytes() == steps["a"][n:].tobytes()
    if n >= 2:
        half = n // 2
        cache = model.new_cache(slots=2)
        model.forward_batch([(0, a[:half]), (1, b[:n - half])], cache)
        both = model.forward_batch([(0, a[half:n]), (1, b[n - half:])], cache, all_logits=True)
        want = np.concatenate([steps["a"][half:n], steps["b"][n - half:]])
        assert both.tobytes() == want.tobytes()


@pytest.mark.parametrize("all_logits", [False, True])
def test_passes_longer_than_pass_rows_run_in_pieces_with_the_same_bits(monkeypatch, all_logits):
    """Past config.PASS_ROWS rows a forward runs as several passes (segments cut where a pass
    fills); every row's logits are those of one big pass, bit for bit, and positions advance alike."""
    import llama2.model as M
    from llama2.kvcache import CacheFull
    _, model = make(TINY)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (23, 5, 40)]
    one = model.new_cache(slots=3)
    whole = model.forward_batch(list(enumerate(seqs)), one, all_logits)
    monkeypatch.setattr(M, "PASS_ROWS", 7)  # 68 rows -> 10 passes, every segment cut at least once
    calls = []
    plan = model.plan
    monkeypatch.setattr(model, "plan", lambda x, *a: calls.append(len(x)) or plan(x, *a))
    cut = model.new_cache(slots=3)
    pieces = model.forward_batch(list(enumerate(seqs)), cut, all_logits)
    assert max(calls) == 7 and sum(calls) == 68
    np.testing.assert_array_equal(pieces.view(np.uint32), whole.view(np.uint32))
    assert list(cut.pos) == list(one.pos) == [23, 5, 40]
    # a pool too small for the whole request raises before any position moves
    small = model.new_cache(slots=3, blocks=2)
    with pytest.raises(CacheFull):
        model.forward_batch(list(enumerate(seqs)), small)
    assert list(small.pos) == [0, 0, 0]
