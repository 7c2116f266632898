"""Prompt packing in the scheduler: new prompts (and decode rows) share a forward pass while the pass
holds at most the model's invariant_rows rows, and every request still gets the bits it gets alone
(generate(), which `llama2 run` prints); longer prompts keep a pass of their own."""

import queue
import threading

import numpy as np
import pytest

from conftest import asset
from llama2.server.scheduler import Scheduler
from test_server_scheduler import TIMEOUT_S, collect, params, reference


@pytest.fixture(scope="module", params=["stories260K.bin", "kquant/rand256-q4_k_m.gguf"])
def llama(request):
    from llama2 import Llama
    tok = asset("tok512.bin") if request.param.endswith(".bin") else None
    return Llama.load(asset(request.param), tok)


class Counting:
    """The real model, recording each pass's segments as (slot, rows); `invariant_rows` may be
    forced (the scheduler packs by it)."""

    def __init__(self, model, invariant_rows=None):
        self.model, self.passes = model, []
        self.config = model.config
        self.invariant_rows = model.invariant_rows if invariant_rows is None else invariant_rows

    def new_cache(self, *args, **kw):
        return self.model.new_cache(*args, **kw)

    def warm_up(self):
        self.model.warm_up()

    def forward_batch(self, segments, cache, all_logits=False, adapters=None):
        self.passes.append([(slot, len(tokens)) for slot, tokens in segments])
        return self.model.forward_batch(segments, cache, all_logits, adapters)


PROMPTS = ["Once upon a time", "Lily", "The dog ran to the park", "Tom had a big red ball", "", "Sun"]


def run_all(llama, model, ps, **kw):
    """Submit every request before the scheduler starts (so their prompts arrive in one step);
    return each one's (token, text, finish) list."""
    sched = Scheduler(model, llama.tokenizer, max_batch=len(ps), max_queue=len(ps), **kw)
    queues = [queue.Queue() for _ in ps]
    for p, q in zip(ps, queues):
        sched.submit(p, q.put)
    sched.start()
    try:
        out = []
        for q in queues:
            events, err = collect(q)
            assert err is None
            out.append([(e.token, e.text, e.finish_reason) for e in events])
        return out
    finally:
        sched.stop(TIMEOUT_S)


def seeded(llama, n=6):
    return [params(llama, PROMPTS[i % len(PROMPTS)], 6 + 3 * i, seed=40 + i,
                   temperature=[1.0, 0.8, 0.0][i % 3], top_p=[0.9, 0.0, 0.5][i % 3]) for i in range(n)]


@pytest.mark.parametrize("name", ["stories260K-q8.bin", "kquant/rand256-q8_0.gguf", "kquant/rand256-f16.gguf",
                                  "kquant/rand256-q6_k.gguf"])
def test_every_weight_type_keeps_the_promise(name):
    from llama2 import Llama
    test_a_packed_pass_gives_every_row_its_bits_alone(
        Llama.load(asset(name), asset("tok512.bin") if name.endswith(".bin") else None))


def test_a_packed_pass_gives_every_row_its_bits_alone(llama):
    """The engine's promise the packing rests on: prompts and decode rows in one pass of at most
    invariant_rows rows get exactly the logits each gets in a pass of its own."""
    m = llama.model
    limit = m.invariant_rows
    prompts = [llama.encode(p) for p in PROMPTS]

    def alone(tokens, follow):
        cache = m.new_cache(1)
        first = m.forward(tokens, cache)[-1]
        return first, m.forward([follow], cache)[-1]

    cache = m.new_cache(len(prompts))
    segments, rows = [], 0
    for slot, p in enumerate(prompts):
        if rows + len(p) > limit:
            break
        segments.append((slot, p))
        rows += len(p)
    assert len(segments) >= 2, "the test's prompts must fit two to a pass"
    firsts = m.forward_batch(segments, cache)
    follows = [int(row.argmax()) for row in firsts]
    seconds = m.forward_batch([(slot, [t]) for (slot, _), t in zip(segments, follows)], cache)
    for i, (slot, p) in enumerate(segments):
        a, b = alone(p, follows[i])
        assert np.array_equal(firsts[i], a) and np.array_equal(seconds[i], b), slot


def test_prompts_share_passes_and_give_the_same_tokens_as_alone(llama):
    """With the model's own invariant_rows, the six prompts arriving together are packed into
    fewer passes than prompts, no packed pass exceeds the limit, and every seeded request gives
    exactly generate()'s tokens (`llama2 run`'s bytes)."""
    counting = Counting(llama.model)
    ps = seeded(llama)
    assert run_all(llama, counting, ps) == [reference(llama, p) for p in ps]
    limit = counting.invariant_rows
    first = counting.passes[0]
    assert sum(rows > 1 for _, rows in first) >= 2, first  # prompts packed together
    prompt_passes = [p for p in counting.passes if any(rows > 1 for _, rows in p)]
    assert len(prompt_passes) < len(ps)
    for p in counting.passes:
        assert len(p) == 1 or sum(rows for _, rows in p) <= limit, p


def test_prompts_and_decodes_share_a_pass(llama):
    """A prompt arriving while others decode joins their pass when the rows fit."""
    counting = Counting(llama.model)
    sched = Scheduler(counting, llama.tokenizer, max_batch=4, max_queue=4)
    sched.start()
    try:
        ps = [params(llama, "Once upon a time", 30, seed=7), params(llama, "Lily", 30, seed=8)]
        qs = [queue.Queue(), queue.Queue()]
        go, seen = threading.Event(), []

        def first_sink(item):  # holds the scheduler at the first request's first event until the
            seen.append(item)  # second is queued, so the second's prompt meets its decodes
            qs[0].put(item)
            if len(seen) == 1:
                assert go.wait(TIMEOUT_S)

        sched.submit(ps[0], first_sink)
        qs[0].get(timeout=TIMEOUT_S)  # the first request decodes now
        sched.submit(ps[1], qs[1].put)
        go.set()
        out = []
        for q in qs:
            events, err = collect(q)
            assert err is None
            out.append([(e.token, e.text, e.finish_reason) for e in events])
    finally:
        sched.stop(TIMEOUT_S)
    assert out[1] == reference(llama, ps[1])
    assert out[0] == reference(llama, ps[0])[1:]  # its first event was taken above
    mixed = [p for p in counting.passes if len(p) > 1 and {rows > 1 for _, rows in p} == {True, False}]
    assert mixed, counting.passes


def test_a_small_invariant_rows_keeps_longer_prompts_alone(llama):
    """Forced down to 3 rows: a prompt of more than 3 tokens gets a pass of its own, short rows
    (decodes, a short prompt) share passes of at most 3, and the tokens are still generate()'s."""
    counting = Counting(llama.model, invariant_rows=3)
    ps = seeded(llama)
    assert run_all(llama, counting, ps) == [reference(llama, p) for p in ps]
    for p in counting.passes:
        total = sum(rows for _, rows in p)
        assert total <= 3 or len(p) == 1, p
    long_prompts = sum(len(p.prompt) > 3 for p in ps)
    alone = [p for p in counting.passes if len(p) == 1 and p[0][1] > 3]
    assert len(alone) == long_prompts
    assert any(len(p) > 1 for p in counting.passes)  # decodes still grouped


def test_a_large_invariant_rows_packs_a_step_into_one_pass(llama):
    """Forced up to 1000 rows (the pass structure only: beyond the engine's real figure the bits are
    not promised): each step of the six requests is one pass."""
    counting = Counting(llama.model, invariant_rows=1000)
    run_all(llama, counting, seeded(llama))
    assert sorted(slot for slot, _ in counting.passes[0]) == list(range(6))
    assert all(len({slot for slot, _ in p}) == len(p) for p in counting.passes)
    first_rows = sum(rows for _, rows in counting.passes[0])
    assert first_rows == sum(len(p.prompt) for p in seeded(llama))
