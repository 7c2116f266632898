"""The server's paged KV cache, in-process (the scheduler) and over HTTP: a budget smaller than the
demand queues, then refuses (503 with Retry-After); every admitted request completes with the text
it gets alone; blocks come back on finish, cancel and disconnect (pool accounting checked after
every pass); a request larger than the pool ends with "length"; prefix reuse computes only the
new tokens of a chat's next turn."""

import queue
import threading

import httpx
import pytest

from conftest import asset
from llama2.server.scheduler import Params, PromptTooLong, QueueFull, Scheduler
from server_helpers import Server
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
