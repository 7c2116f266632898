"""The paged KV cache: a sequence's logits do not depend on where its blocks lie or who else uses
the pool, blocks come back on every way out, copy on write keeps diverging sequences apart, prefix
reuse gives a sequence another's blocks only for the tokens they share, and memory follows the
positions used, not the context."""

import numpy as np
import pytest

from llama2 import checkpoint, kvcache
from llama2.config import ModelConfig
from llama2.model import Transformer

from conftest import TINY, random_weights

GQA = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=128)


def model_of(config, seed=0, kv_type="f32"):
    return Transformer(checkpoint.Checkpoint(config, random_weights(config, seed), 1, "<memory>"), kv_type=kv_type)


def alone(model, tokens, prompt_len):
    """Logits of `tokens` in a fresh cache of its own: the prompt in one pass, then one at a time."""
    cache = model.new_cache()
    out = [model.forward(tokens[:prompt_len], cache)[-1]]
    for t in tokens[prompt_len:]:
        out.append(model.forward([t], cache)[-1])
    return np.array(out)


@pytest.mark.parametrize("kv_type", ["f32", "q8_0"])
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_equals_alone_for_random_interleavings(kv_type, seed):
    # Sequences of different lengths are admitted, decoded in random groups and retired at random,
    # in a pool too small for all at once (freed blocks are reused in scrambled order). Every logit
    # equals the sequence run alone exactly, and the pool's accounting holds after every step.
    rng = np.random.default_rng(seed)
    model = model_of(GQA, seed, kv_type)
    cache = model.new_cache(slots=6, blocks=20)
    todo = []
    for i in range(14):
        n, p = int(rng.integers(20, 60)), int(rng.integers(1, 19))
        todo.append((list(rng.integers(0, GQA.vocab_size, n)), p))
    want = [alone(model, t, p) for t, p in todo]
    got = [[] for _ in todo]
    active = {}  # slot -> (index, next token position)
    nxt = 0
    while nxt < len(todo) or active:
        free = [s for s in range(6) if s not in active]
        op = rng.integers(3)
        if op == 0 and free and nxt < len(todo):
            tokens, p = todo[nxt]
            if cache.free_blocks() >= -(-len(tokens) // 16):
                slot = free[int(rng.integers(len(free)))]
                got[nxt].append(model.forward(tokens[:p], cache, slot)[-1])
                active[slot] = (nxt, p)
                nxt += 1
        elif op == 1 and active:
            slots = list(active)
            rng.shuffle(slots)
            group = slots[:int(rng.integers(1, min(8, len(slots)) + 1))]
            segs = [(s, [todo[active[s][0]][0][active[s][1]]]) for s in group]
            logits = model.forward_batch(segs, cache)
            for s, row in zip(group, logits):
                i, at = active[s]
                got[i].append(row)
                active[s] = (i, at + 1)
                if at + 1 == len(todo[i][0]):
                    del active[s]
                    cache.reset(s)
        elif op == 2 and active and rng.random() < 0.2:  # cancelled midway
            s = list(active)[int(rng.integers(len(active)))]
            i, _ = active.pop(s)
            cache.reset(s)
            want[i] = want[i][:len(got[i])]
        elif not active and nxt >= len(todo):
            break
        cache.check()
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.array(g), w[:len(g)])
        assert len(g) == len(w)
    assert cache.pool.free_blocks == 20


def test_copy_on_write_keeps_diverging_continuations_apart():
    model = model_of(TINY, 3)
    rng = np.random.default_rng(5)
    prefix = list(rng.integers(0, TINY.vocab_size, 21))  # ends inside the second block
    a, b = list(rng.integers(0, TINY.vocab_size, 12)), list(rng.integers(0, TINY.vocab_size, 12))
    cache = model.new_cache(slots=2, blocks=8)
    model.forward(prefix, cache, 0)
    cache.fork(0, 1)
    assert cache.tables[0] == cache.tables[1]
    got = {0: [], 1: []}
    for ta, tb in zip(a, b):  # alternate: each write into the shared block must copy it first
        got[1].append(model.forward([tb], cache, 1)[-1])
        got[0].append(model.forward([ta], cache, 0)[-1])
        cache.check()
    assert cache.tables[0][0] == cache.tables[1][0] and cache.tables[0][1] != cache.tables[1][1]
    np.testing.assert_array_equal(np.array(got[0]), alone(model, prefix + a, 21)[1:])
    np.testing.assert_array_equal(np.array(got[1]), alone(model, prefix + b, 21)[1:])
    cache.reset(0)
    cache.reset(1)
    cache.check()
    assert cache.pool.free_blocks == 8


def test_prefix_reuse_shares_only_the_blocks_of_the_same_tokens():
    model = model_of(GQA, 2)
    rng = np.random.default_rng(9)
    system = list(rng.integers(0, GQA.vocab_size, 40))
    a = system + list(rng.integers(0, GQA.vocab_size, 9))
    b = system + list(rng.integers(0, GQA.vocab_size, 7))
    cache = model.new_cache(slots=2, blocks=10)
    model.forward(a, cache, 0)
    cache.publish(0, a)
    cache.reset(0)
    cache.check()
    assert cache.pool.free_blocks == 7  # the index keeps the three full blocks of a
    reused = cache.reuse_prefix(1, b)
    assert reused == 32 and cache.tables[1] == [0, 1]
    logits = model.forward(b[reused:], cache, 1, all_logits=True)
    ref = model.forward(b, model.new_cache(), all_logits=True)[reused:]
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)
    cache.check()
    other = list(rng.integers(0, GQA.vocab_size, 40))  # shares no block: nothing reused
    assert cache.reuse_prefix(0, other) == 0
    cache.reset(0)
    cache.reset(1)
    # under pressure the index gives its blocks back
    cache.reserve(0, 128)
    cache.reserve(1, 32)
    assert cache.pool.free_blocks == 0 and not cache._index
    cache.reset(0)
    cache.reset(1)
    cache.check()


def test_a_full_pool_raises_cache_full_and_keeps_positions():
    model = model_of(TINY)
    cache = model.new_cache(slots=2, blocks=3)
    model.forward(list(range(1, 33)), cache, 0)
    with pytest.raises(kvcache.CacheFull, match="KV cache is full"):
        model.forward(list(range(1, 20)), cache, 1)
    assert cache.pos[1] == 0 and cache.pos[0] == 32
    cache.reset(1)
    cache.check()


def test_unknown_kv_type_is_a_usage_error():
    from llama2.errors import UsageError
    with pytest.raises(UsageError, match="--kv-type f8: expected one of f32, f16, bf16, q8_0"):
        model_of(TINY, kv_type="f8")


def _rss_anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    pytest.skip("no RssAnon in /proc/self/status")


def test_resident_memory_grows_with_positions_not_context():
    # 1 MiB of f32 keys and values per 128 positions; a context of 65536 would be 512 MiB.
    cfg = ModelConfig(dim=256, hidden_dim=64, n_layers=4, n_heads=2, n_kv_heads=2, vocab_size=64,
                      seq_len=65536)
    per_token = kvcache.bytes_per_token(cfg, "f32")
    assert per_token == 8192
    model = model_of(cfg)
    tokens = list(np.random.default_rng(0).integers(0, 64, 200))
    before = _rss_anon_kb()
    cache = model.new_cache()
    model.forward(tokens, cache)
    for t in tokens[:40]:
        model.forward([t], cache)
    grown = (_rss_anon_kb() - before) * 1024
    used = 240 * per_token  # 1.9 MiB of cache in use
    assert grown < used + (24 << 20), f"{grown / 2**20:.1f} MiB for {used / 2**20:.1f} MiB of positions"
    assert cache.pool.k.nbytes + cache.pool.v.nbytes == 65536 * per_token  # 512 MiB mapped, untouched


def test_cli_kv_type_flag(tmp_path, monkeypatch):
    import io

    from conftest import asset
    from llama2.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*flags):
        out, err = io.BytesIO(), io.StringIO()
        code = main(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "-t", "0", "-n", "40",
                     "-i", "Once upon a time", *flags], stdout=out, stderr=err, stdin=io.StringIO(""))
        return code, out.getvalue(), err.getvalue()

    code, f32_out, _ = run()
    assert code == 0 and f32_out.startswith(b"Once upon a time")
    for kv_type in ("f16", "q8_0"):
        code, out, _ = run("--kv-type", kv_type)
        assert code == 0 and out.startswith(b"Once upon a time") and len(out) > 60
    code, _, err = run("--kv-type", "f8")
    assert code == 2 and "--kv-type" in err and len(err.strip().splitlines()) <= 2


def test_cli_chat_computes_only_each_turns_new_tokens(monkeypatch):
    from conftest import asset
    from llama2.chat import ChatSession
    from llama2.llama import Llama
    from llama2.sampler import Sampler

    llama = Llama.load(asset("stories260K.bin"), asset("tok512.bin"))
    fed = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda tokens, cache, *a, **k: (fed.append(len(tokens)),
                                                                                  forward(tokens, cache, *a, **k))[1])
    import itertools
    chat = ChatSession(llama, Sampler(llama.config.vocab_size, 0.0, 0.9, 1))
    reply = chat.turn("Tell me a story about a cat.", "You are a kind storyteller.")
    list(itertools.islice(reply, 20))  # the user stops the reply after 20 tokens
    reply.close()
    before = chat.pos
    fed.clear()
    list(itertools.islice(chat.turn("And then?"), 5))
    # the second turn's prompt pass holds its own tokens only, then one token per pass
    assert fed[0] == len(llama.tokenizer.encode("[INST] And then? [/INST]", bos=True)) < before
    assert fed[1:] == [1] * (len(fed) - 1) and chat.cache.pos[0] == chat.pos


def test_a_kv_type_refuses_rows_it_cannot_hold():
    """The type's record decides (native/kv.h): q8_0 needs head_dim a multiple of 32 (or below),
    said in one line naming the flag, when the model is made."""
    from llama2.errors import UsageError

    c = ModelConfig(dim=96, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=50, seq_len=32)
    ckpt = checkpoint.Checkpoint(c, random_weights(c, 0), 1, "<memory>")
    with pytest.raises(UsageError, match="--kv-type q8_0: needs head_dim a multiple of 32.* head_dim is 48"):
        Transformer(ckpt, kv_type="q8_0")
    assert Transformer(ckpt, kv_type="f16").new_cache().pool.k.shape[-1] == 2 * 48


@pytest.mark.parametrize("command", ["run", "serve"])
def test_kv_type_help_is_made_from_the_records(command, capsys):
    """--kv-type's help lists the registry's types and each format's default (its reader's KV_TYPE)."""
    import re

    from llama2 import formats
    from llama2.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    line = text[text.index("--kv-type TYPE KV cache type"):]
    assert re.search(", ".join(list(kvcache.TYPES)[:-1]) + " or " + list(kvcache.TYPES)[-1], line)
    for fmt, kv_type in formats.default_kv_types().items():
        assert kv_type in kvcache.TYPES
        assert re.search(rf"{kv_type} for [a-z0-9 ]*\b{fmt}\b", line), (fmt, kv_type)
