"""The server's paged KV cache, in-process (the scheduler) and over HTTP: a budget smaller than the
demand queues, then refuses (503 with Retry-After); every admitted request completes with the text
it gets alone; blocks come back on finish, cancel and disconnect (pool accounting checked after
every pass); a request larger than the pool ends with "length"; prefix reuse computes only the
new tokens of a chat's next turn, also when its reply comes back as text whose tokens are not those
sampled (the history is computed ahead when the reply ends), with the bytes of no reuse."""

import queue
import threading

import httpx
import pytest

from conftest import asset
from llama2.server.scheduler import Params, PromptTooLong, QueueFull, Scheduler
from server_helpers import Server, metric
from test_server_scheduler import TIMEOUT_S, collect, params, reference


class Checked(Scheduler):
    """A scheduler that checks its pool's accounting after every pass and records each pass's
    segment lengths."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.passes = []
        self.errors = []

    def _pass(self, group, waiting):
        self.passes.append([len(seq.feed) for seq in group if not seq.job.cancelled])
        super()._pass(group, waiting)
        try:
            self.cache.check()
            with self._cond:
                held = sum(seq.job.blocks for seq in self._active.values())
                assert sum(len(self.cache.tables[s]) for s in self._active) <= held <= self._committed
        except AssertionError as e:
            self.errors.append(e)


def idle_and_whole(sched):
    """Nothing running or promised; every block free or held only by the prefix index."""
    assert sched.load() == (0, 0)
    assert sched._committed == 0
    assert all(not t for t in sched.cache.tables)
    assert sched.cache.free_blocks() == sched.blocks
    sched.cache.check()
    assert not sched.errors


def test_budget_below_demand_queues_then_refuses_and_admitted_requests_equal_alone(llama):
    # 64 positions: each request's worst case (prompt + 20 tokens) is 2 blocks of 16, so two run
    sched = Checked(llama.model, llama.tokenizer, max_batch=8, max_queue=2, kv_budget=64)
    ps = [params(llama, p, 20, seed=5 + i, temperature=[0.0, 1.0][i % 2])
          for i, p in enumerate(["Once upon a time", "Lily", "The dog ran", "Tom"])]
    queues = [queue.Queue() for _ in ps]
    for p, q in zip(ps, queues):
        sched.submit(p, q.put)
    assert sched.load() == (0, 4) and len(sched._waiting) == 2
    with pytest.raises(QueueFull, match="2 running, 2 waiting .limit 2.; KV cache: 4 of 4 blocks"):
        sched.submit(ps[0], print)
    sched.start()
    try:
        for p, q in zip(ps, queues):
            events, err = collect(q)
            assert err is None
            assert [(e.token, e.text, e.finish_reason) for e in events] == reference(llama, p)
        assert max(len(g) for g in sched.passes) == 2  # never more than the pool allowed
        idle_and_whole(sched)
    finally:
        sched.stop(TIMEOUT_S)


def test_blocks_come_back_on_cancel_and_disconnect(llama):
    sched = Checked(llama.model, llama.tokenizer, max_batch=4, max_queue=4, kv_budget=256)
    sched.start()
    try:
        first = queue.Queue()
        job = sched.submit(params(llama, "Tom", 200, temperature=0, stop_tokens=frozenset()), first.put)
        first.get(timeout=TIMEOUT_S)
        job.cancel()

        gone = queue.Queue()

        def disconnected(event):  # the listener is gone after its first event
            gone.put(event)
            raise RuntimeError("client went away")
        sched.submit(params(llama, "Lily", 200, temperature=0, stop_tokens=frozenset()), disconnected)
        gone.get(timeout=TIMEOUT_S)
        done = queue.Queue()
        sched.submit(params(llama, "The sun", 5, temperature=0), done.put)
        events, err = collect(done)
        assert err is None
        for _ in range(100):
            if sched.load() == (0, 0):
                break
            import time
            time.sleep(0.05)
        idle_and_whole(sched)
    finally:
        sched.stop(TIMEOUT_S)


def test_a_request_larger_than_the_pool_ends_with_length(llama):
    sched = Checked(llama.model, llama.tokenizer, max_batch=2, max_queue=2, kv_budget=32)
    sched.start()
    try:
        q = queue.Queue()
        p = params(llama, "Once upon a time", 100, temperature=0, stop_tokens=frozenset())
        sched.submit(p, q.put)
        events, err = collect(q)
        assert err is None and events[-1].finish_reason == "length"
        tokens = [e.token for e in events if e.token is not None]
        assert len(p.prompt) + len(tokens) - 1 == 32  # every position of the pool was used
        assert tokens == [t for t, _, _ in reference(llama, p)][:len(tokens)]
        with pytest.raises(PromptTooLong, match="the prompt's 33 tokens exceed the KV cache budget of 32"):
            sched.submit(Params(prompt=(1,) * 33, max_tokens=1, temperature=0.0, top_p=0.9, seed=1), q.put)
        idle_and_whole(sched)
    finally:
        sched.stop(TIMEOUT_S)


def test_a_chats_next_turn_computes_only_its_new_tokens(llama):
    from llama2.chat import encode_dialog
    sched = Checked(llama.model, llama.tokenizer, max_batch=2, max_queue=2, kv_budget=1024)
    sched.start()
    try:
        system = "You are a storyteller who tells short stories about a little girl named Lily and her dog."
        first = encode_dialog(llama.tokenizer, [("system", system), ("user", "Tell me a story.")])
        q = queue.Queue()
        p1 = Params(prompt=tuple(first), max_tokens=30, temperature=0.0, top_p=0.9, seed=1,
                    stop_tokens=frozenset((1, 2)))
        sched.submit(p1, q.put)
        events, err = collect(q)
        reply = "".join(e.text for e in events)
        sampled = [e.token for e in events if e.token is not None]
        # what the cache held when the first request finished: the last token sampled is not fed
        history = list(first) + (sampled[:-1] if events[-1].finish_reason == "length" else sampled)
        second = encode_dialog(llama.tokenizer, [("system", system), ("user", "Tell me a story."),
                                                 ("assistant", reply), ("user", "And then?")])
        p2 = Params(prompt=tuple(second), max_tokens=10, temperature=0.0, top_p=0.9, seed=1,
                    stop_tokens=frozenset((1, 2)))
        sched.passes.clear()
        sched.submit(p2, q.put)
        events, err = collect(q)
        assert err is None
        computed = sched.passes[0][0]
        shared = next((i for i, (a, b) in enumerate(zip(history, second)) if a != b), len(history))
        assert shared > len(first)  # the reply's tokens are reused too
        assert computed == len(second) - min(shared, len(second) - 1) // 16 * 16
        assert computed < len(second) / 3
        texts = [e.text for e in events]
        assert "".join(texts) == "".join(t for _, t, _ in reference(llama, p2))  # greedy: same text
        idle_and_whole(sched)
    finally:
        sched.stop(TIMEOUT_S)


def test_no_prefix_cache_computes_every_prompt_token(llama):
    sched = Checked(llama.model, llama.tokenizer, max_batch=2, max_queue=2, kv_budget=512,
                    prefix_cache=False)
    sched.start()
    try:
        p = params(llama, "Once upon a time there was a little girl named Lily who loved her dog", 5, seed=3)
        for _ in range(2):
            q = queue.Queue()
            sched.submit(p, q.put)
            events, err = collect(q)
            assert [(e.token, e.text, e.finish_reason) for e in events] == reference(llama, p)
        assert [g for g in sched.passes if g[0] > 1] == [[len(p.prompt)], [len(p.prompt)]]
        assert not sched.cache._index
        idle_and_whole(sched)
    finally:
        sched.stop(TIMEOUT_S)


def test_http_budget_below_demand_gives_503_with_retry_after_and_prints_the_budget():
    # 256 positions; each request may need 5 + 250 of them: one runs, one waits, the rest get 503
    server = Server("--kv-budget", "256", "--max-queue", "1", "--kv-type", "q8_0")
    n = 8
    statuses, lock, barrier = [], threading.Lock(), threading.Barrier(n)
    body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 250, "temperature": 0}

    def send():
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c:
            c.get("/models")  # connected before the race starts
            barrier.wait(TIMEOUT_S)
            r = c.post("/completions", json=body)
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

    try:
        assert "KV cache q8_0, 256 positions shared by all requests (--kv-budget;" in server.stderr
        threads = [threading.Thread(target=send) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(2 * TIMEOUT_S)
        busy = [s for s in statuses if s[0] == 503]
        assert len(statuses) == n and {s[0] for s in statuses} == {200, 503}
        assert busy[0][1] == "1" and "KV cache: 16 of 16 blocks" in busy[0][2]["error"]["message"]
        texts = {s[2]["choices"][0]["text"] for s in statuses if s[0] == 200}
        assert len(texts) == 1  # greedy: every admitted request gives the text it gets alone
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client:
            health = server.wait_idle(client)
            assert health["kv_cache"]["blocks"] == 16 and health["kv_cache"]["committed"] == 0
            page = httpx.get(server.base + "/metrics", timeout=TIMEOUT_S).text
            assert 'llama2_kv_blocks{state="total"} 16' in page and 'llama2_kv_blocks{state="committed"} 0' in page
            r = client.post("/completions", json=dict(body, prompt="a " * 300, max_tokens=1))
            assert r.status_code == 400 and "exceed the KV cache budget of 256" in r.json()["error"]["message"]
    finally:
        assert server.terminate() == 0


def test_default_budget_is_what_the_memory_free_after_the_weights_holds(llama, monkeypatch):
    import argparse
    import io

    from llama2 import kvcache, memory
    from llama2.cli import serve

    path = asset("stories260K.bin")
    per = kvcache.bytes_per_token(llama.config, "f32")
    weights = path.stat().st_size
    err = io.StringIO()

    class IO:
        def err(self, text):
            err.write(text)

    def budget(free, max_batch=8, flag=None):
        monkeypatch.setattr(memory, "available", lambda: memory.Available(memory=free))
        args = argparse.Namespace(kv_budget=flag, max_batch=max_batch)
        return serve.kv_budget(args, llama, path, IO())

    assert budget(weights + 1000 * per) == 800  # 80% of what is free after the weights, in blocks
    assert "800 positions shared by all requests (default: the memory free after the weights" in err.getvalue()
    assert budget(weights + 10 ** 12) == 8 * llama.config.seq_len  # at most --max-batch contexts
    assert budget(weights // 2) == kvcache.BLOCK_TOKENS  # at least one block
    assert budget(10 ** 12, flag=100) == 112  # --kv-budget, rounded up to whole blocks
    assert "112 positions shared by all requests (--kv-budget;" in err.getvalue()


def test_kv_flags_are_checked_before_loading():
    import io

    from llama2.cli import main

    for flags, message in ((["--kv-budget", "0"], "--kv-budget 0: must be at least 1 position"),
                           (["--kv-type", "f8"], "--kv-type")):
        err = io.StringIO()
        code = main(["serve", str(asset("stories260K.bin")), *flags], stdout=io.BytesIO(), stderr=err,
                    stdin=io.StringIO(""))
        assert code == 2 and message in err.getvalue()


# -- a chat's next turn -------------------------------------------------------------------------

SYSTEM = ("You are a storyteller who tells short stories about a little girl named Lily, her dog "
          "and their friends in the park.")
NEXT = "Thank you. And could you say that again more briefly?"


def _chat(client, messages, **extra):
    body = {"model": "stories260K", "messages": messages, "max_tokens": 100, **extra}
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]


def _turns(client, first, edit=lambda reply: reply, **extra):
    """Turn 1, then turn 2 with turn 1's reply sent back (through `edit`): (reply, usage) of each."""
    reply, usage = _chat(client, first, **extra)
    second = first + [{"role": "assistant", "content": edit(reply)}, {"role": "user", "content": NEXT}]
    return (reply, usage), _chat(client, second, **extra)


def _cached(usage) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def _pairs(messages):
    return [(m["role"], m["content"]) for m in messages]


CHATS = [  # (first turn's user message, sampling): greedy and seeded
    ("Round 1000, reader 0: can you help me with mystery novels?", {"temperature": 0}),
    ("Tell me a story.", {"temperature": 0.8, "seed": 1}),
    ("Tell me a story about the dog.", {"temperature": 0.8, "seed": 4}),
]


def test_a_chats_second_turn_computes_only_its_new_message_with_the_bytes_of_no_reuse(llama):
    """The reply comes back as text inside the template: its tokens there may differ from those
    sampled (here the template's space after [/INST], which the model did not write). The server
    computes that history when the reply ends, so the second turn computes at most its new message
    and one block; every answer is byte for byte that of a server that reuses nothing."""
    from llama2.chat import encode_dialog
    reuse, fresh = Server(), Server("--no-prefix-cache")
    differs = cached = 0
    try:
        with httpx.Client(base_url=reuse.url, timeout=TIMEOUT_S) as a, \
             httpx.Client(base_url=fresh.url, timeout=TIMEOUT_S) as b:
            for user, sampling in CHATS:
                first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
                (reply, u1), (answer, u2) = _turns(a, first, **sampling)
                (reply_b, u1_b), (answer_b, u2_b) = _turns(b, first, **sampling)
                assert (reply, answer) == (reply_b, answer_b)  # seeded: the same bytes
                assert _cached(u1_b) == _cached(u2_b) == 0
                cached += _cached(u1) + _cached(u2)
                assert u2["prompt_tokens"] == u2_b["prompt_tokens"]
                new = len(llama.tokenizer.encode(f"[INST] {NEXT} [/INST]", bos=True))  # Meta's last turn
                computed = u2["prompt_tokens"] - _cached(u2)
                assert computed <= new + 16, (user, computed, new)
                # a reply that does not begin with a space is not what the template sends back
                # ("[/INST] " + reply): no block past turn 1's prompt would match it
                differs += not reply.startswith(" ")
                prompt1 = encode_dialog(llama.tokenizer, _pairs(first))
                assert _cached(u2) > len(prompt1)
            page = a.get(reuse.base + "/metrics").text
            assert metric(page, "llama2_prompt_tokens_cached_total") == cached
        assert differs  # at least one chat needed more than the blocks turn 1 left behind
    finally:
        assert reuse.terminate() == 0 and fresh.terminate() == 0


def test_an_edited_reply_is_reused_only_up_to_the_edit(llama):
    """The client changes the reply before sending it back: the blocks hold the reply as it was,
    so the second turn reuses them up to the block of the edit and computes the rest, with the
    bytes of a server that reuses nothing."""
    from llama2.chat import encode_dialog
    reuse, fresh = Server(), Server("--no-prefix-cache")

    def edit(reply):
        cut = reply.index(" ", len(reply) // 2)
        return reply[:cut] + " and a big red balloon" + reply[cut:]

    try:
        with httpx.Client(base_url=reuse.url, timeout=TIMEOUT_S) as a, \
             httpx.Client(base_url=fresh.url, timeout=TIMEOUT_S) as b:
            user, sampling = CHATS[1]
            first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            (reply, _), (answer, usage) = _turns(a, first, edit, **sampling)
            (reply_b, _), (answer_b, usage_b) = _turns(b, first, edit, **sampling)
            assert (reply, answer) == (reply_b, answer_b)
            assert usage["prompt_tokens"] == usage_b["prompt_tokens"]
        pairs = _pairs(first)
        verbatim = encode_dialog(llama.tokenizer, pairs + [("assistant", reply), ("user", NEXT)])
        edited = encode_dialog(llama.tokenizer, pairs + [("assistant", edit(reply)), ("user", NEXT)])
        same = next(i for i, (x, y) in enumerate(zip(verbatim, edited)) if x != y)
        assert same > len(encode_dialog(llama.tokenizer, pairs)) + 16  # the edit is well inside the reply
        assert _cached(usage) == same // 16 * 16  # not one block past it
    finally:
        assert reuse.terminate() == 0 and fresh.terminate() == 0


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_a_history_ending_with_a_reply_is_where_its_next_turn_begins(llama, template):
    """What the server computes ahead of a chat's next turn (llama2.c files' built-in templates;
    tests/engine/test_chat_templates.py checks the Jinja families)."""
    from llama2.chat import encode_dialog
    tok = llama.tokenizer
    history = [("system", SYSTEM), ("user", "Tell me a story."), ("assistant", " Lily had a dog."),
               ("user", "And then?"), ("assistant", "The dog ran.")]
    for n in (3, 5):
        ids = encode_dialog(tok, history[:n], template, add_generation_prompt=False)
        nxt = encode_dialog(tok, history[:n] + [("user", NEXT)], template)
        assert nxt[:len(ids)] == ids and len(nxt) > len(ids)
    if template == "llama2":  # Meta's chat_completion: each exchange ends with EOS
        assert ids[-1] == llama.config.eos_id and ids.count(llama.config.bos_id) == 2
    with pytest.raises(ValueError, match=r"messages\[3\]: the last message must be from the assistant"):
        encode_dialog(tok, history[:4], template, add_generation_prompt=False)


def test_warm_indexes_a_prompt_before_the_requests_behind_it_get_their_slot(llama):
    from llama2.server.metrics import Metrics
    metrics = Metrics()
    sched = Checked(llama.model, llama.tokenizer, max_batch=2, max_queue=2, kv_budget=256, metrics=metrics)
    text = ("Once upon a time there was a little girl named Lily who loved her dog and her red ball "
            "very much. One day they went to the park and played until the sun went down.")
    p = params(llama, text, 8, seed=3)
    assert len(p.prompt) > 40
    assert sched.warm(p.prompt[:40])  # not started: both wait for the loop, the warm-up first
    q = queue.Queue()
    job = sched.submit(p, q.put)
    sched.start()
    try:
        events, err = collect(q)
        assert err is None
        assert [(e.token, e.text, e.finish_reason) for e in events] == reference(llama, p)  # the same bits
        assert job.reused == 32  # the warm-up's two full blocks, though both were admitted together
        assert sched.passes[:2] == [[40], [len(p.prompt) - 32]]
        assert metrics.requests == {("scheduler", "ok"): 1} and metrics.cached_tokens == 32
        assert metrics.prompt_tokens == 40 + len(p.prompt) - 32  # every prompt token computed is counted
        for _ in range(100):
            if sched.load() == (0, 0):
                break
            import time
            time.sleep(0.05)
        idle_and_whole(sched)
    finally:
        sched.stop(TIMEOUT_S)
    off = Scheduler(llama.model, llama.tokenizer, max_batch=1, max_queue=1, kv_budget=64, prefix_cache=False)
    assert not off.warm(p.prompt)  # nothing to index into
    busy = Scheduler(llama.model, llama.tokenizer, max_batch=1, max_queue=1, kv_budget=64)
    busy.submit(params(llama, "Tom", 3), print)
    busy.submit(params(llama, "Lily", 3), print)  # waits: no slot
    assert not busy.warm(p.prompt[:20])  # a warm-up never waits, nor goes before a request
    assert busy.load() == (0, 2)
