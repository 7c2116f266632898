"""Speculative decoding in the server: every slot drafts (a draft model's steps batched over the
slots, or prompt lookup), the guesses are verified in the scheduler's batched passes with the other
slots' rows, and at temperature 0 each request gets exactly plain decoding's tokens, text, logprobs,
stop strings and grammar-constrained text; rejected rows go back to the KV pool."""

import queue

import pytest

from conftest import asset
from llama2 import Llama
from llama2.server.scheduler import Scheduler
from llama2.speculative import DraftModel, PromptLookup, Speculator
from llama2.structured import Grammar, Spec
from server_helpers import RecordingModel, Server
from test_server_scheduler import TIMEOUT_S, collect, params

PROMPTS = ["Once upon a time", "Lily and Tom went to the park. Lily and Tom", "", "The dog ran", "Tom had a",
           "Sun"]


@pytest.fixture(scope="module")
def llama():
    return Llama.load(asset("stories260K.bin"), asset("tok512.bin"))


@pytest.fixture(scope="module")
def q8():
    return Llama.load(asset("stories260K-q8.bin"), asset("tok512.bin"))


def requests(llama):
    grammar = Grammar.compile(Spec("regex", "( (dog|cat|ball|big|red|little)){2,8}\\."), llama.tokenizer, 512)
    ps = [params(llama, p, 40 + 9 * i, temperature=0, logprobs=[None, 2][i % 2]) for i, p in enumerate(PROMPTS)]
    ps.append(params(llama, "Once upon a time", 120, temperature=0, stop=("park", "ball")))
    ps.append(params(llama, "Tom had a", 50, temperature=0, grammar=grammar, logprobs=1))
    return ps


def serve(llama, ps, speculator, slots):
    sched = Scheduler(llama.model, llama.tokenizer, max_batch=slots, max_queue=len(ps), speculator=speculator)
    queues = [queue.Queue() for _ in ps]
    for p, q in zip(ps, queues):
        sched.submit(p, q.put)
    sched.start()
    try:
        out = []
        for q in queues:
            events, err = collect(q)
            assert err is None, err
            out.append([(e.token, e.text, e.finish_reason, e.logprob) for e in events])
        sched.cache.check()
        return out, sched
    finally:
        sched.stop(TIMEOUT_S)


@pytest.mark.parametrize("kind", ["q8", "lookup"])
@pytest.mark.parametrize("slots", [3, 8])
def test_every_slot_drafts_and_greedy_is_plain(llama, q8, kind, slots):
    ps = requests(llama)
    plain, _ = serve(llama, ps, None, slots)
    proposer = DraftModel(q8.model, llama.model, slots) if kind == "q8" else PromptLookup(2)
    spec = Speculator(proposer, llama.model, 5, adaptive=False)
    fast, sched = serve(llama, ps, spec, slots)
    assert fast == plain
    assert spec.proposed > 0 and 0 < spec.kept < spec.proposed
    assert sched.cache.pool.free_blocks == sched.cache.pool.n_blocks - sum(
        1 for _, b in sched.cache._index.values())  # every slot's blocks back (only the prefix index holds some)


def test_sampled_requests_finish(llama, q8):
    """Sampling through the server with a draft: every request completes, within max_tokens."""
    ps = [params(llama, p, 30, temperature=1.0, top_p=0.9, seed=5 + i) for i, p in enumerate(PROMPTS)]
    spec = Speculator(DraftModel(q8.model, llama.model, 4), llama.model, 4, adaptive=False)
    out, _ = serve(llama, ps, spec, 4)
    for p, events in zip(ps, out):
        assert events[-1][2] in ("stop", "length")
        assert sum(e[0] is not None for e in events) <= p.max_tokens
    assert spec.kept > 0


def test_serve_with_draft_flag():
    """`llama2 serve --draft` answers as plain greedy decoding does."""
    import httpx
    want = Llama.load(asset("stories260K.bin"), asset("tok512.bin")).create_completion(
        "Once upon a time", max_tokens=60, temperature=0)["choices"][0]["text"]
    server = Server("--draft", str(asset("stories260K-q8.bin")), "--draft-max", "4", "--max-batch", "2")
    try:
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}
        r = httpx.post(server.url + "/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    finally:
        assert server.terminate() == 0, server.stderr



def test_slots_verify_their_drafts_in_shared_passes(llama, q8):
    """Several slots' guesses (k+1 rows each) are verified in one pass, and the draft model's
    steps for several slots run in one pass too."""
    rec, draft_rec = RecordingModel(llama.model), RecordingModel(q8.model)
    spec = Speculator(DraftModel(draft_rec, llama.model, 4), llama.model, 3, adaptive=False)
    ps = [params(llama, p, 30, temperature=0) for p in PROMPTS[:4]]
    sched = Scheduler(rec, llama.tokenizer, max_batch=4, max_queue=4, speculator=spec)
    queues = [queue.Queue() for _ in ps]
    for p, q in zip(ps, queues):
        sched.submit(p, q.put)
    sched.start()
    try:
        for q in queues:
            assert collect(q)[1] is None
    finally:
        sched.stop(TIMEOUT_S)
    assert any(sum(rows > 1 for _, rows in segs) >= 2 for segs in rec.passes)
    assert any(len(segs) >= 2 for segs in draft_rec.passes)
