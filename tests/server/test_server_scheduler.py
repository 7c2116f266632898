"""The batching scheduler in-process (no HTTP): its sequences equal generate()'s, admission limits,
cancellation, shutdown; stop strings; the chat dialog encoder."""

import queue
import time

import numpy as np
import pytest

from llama2.chat import encode_dialog, render_llama2
from llama2.generate import generate
from llama2.sampler import Sampler
from llama2.server.scheduler import Cancelled, Params, QueueFull, Scheduler, StopStrings

TIMEOUT_S = 60


def params(llama, prompt, max_tokens, temperature=1.0, top_p=0.9, seed=1, **kw):
    stops = frozenset((llama.config.bos_id, llama.config.eos_id))
    return Params(prompt=tuple(llama.encode(prompt)), max_tokens=max_tokens, temperature=temperature,
                  top_p=top_p, seed=seed, stop_tokens=kw.pop("stop_tokens", stops), **kw)


def collect(q):
    events = []
    while True:
        item = q.get(timeout=TIMEOUT_S)
        if isinstance(item, Exception):
            return events, item
        events.append(item)
        if item.finish_reason is not None:
            return events, None


def reference(llama, p: Params):
    sampler = Sampler(llama.config.vocab_size, p.temperature, p.top_p, p.seed)
    events = generate(llama.model, llama.tokenizer, sampler, list(p.prompt), len(p.prompt) + p.max_tokens - 1)
    return [(e.token, e.text, e.finish_reason) for e in events if not e.is_prompt]


def assert_all_equal_reference(llama, sched, ps):
    """Submit every request at once; each one's events equal generate()'s for it alone."""
    queues = [queue.Queue() for _ in ps]
    for p, q in zip(ps, queues):
        sched.submit(p, q.put)
    for p, q in zip(ps, queues):
        events, err = collect(q)
        assert err is None
        assert [(e.token, e.text, e.finish_reason) for e in events] == reference(llama, p)


@pytest.mark.parametrize("slots", [3, 12])
def test_sequences_equal_generate_whatever_the_batch(llama, slots):
    """Seeded sampling, 24 requests through 3 or 12 slots (more than one decode group): admitted and
    retired at different steps, each gives exactly generate()'s tokens."""
    sched = Scheduler(llama.model, llama.tokenizer, max_batch=slots, max_queue=30)
    sched.start()
    try:
        prompts = ["Once upon a time", "Lily", "", "The dog ran", "Tom"]
        ps = [params(llama, prompts[i % len(prompts)], 5 + 9 * i % 40, seed=100 + i,
                     temperature=[1.0, 0.7, 0.0][i % 3], top_p=[0.9, 0.0, 0.5][i % 3]) for i in range(24)]
        assert_all_equal_reference(llama, sched, ps)
    finally:
        sched.stop(TIMEOUT_S)


def test_decode_rows_do_not_depend_on_each_other(llama):
    """What the invariant scheduler relies on: a prompt prefilled alone, then decode rows in passes
    of 8 rows, give bit for bit the logits of the sequence run alone."""
    m = llama.model
    prompts = [llama.encode(p) for p in ["Once upon a time", "Lily", "", "The dog ran", "Tom"]]

    def alone(p, steps):
        cache = m.new_cache(1)
        out = [m.forward(p, cache)[-1]]
        for _ in range(steps):
            out.append(m.forward([int(out[-1].argmax())], cache)[-1])
        return np.array(out)

    g = 8
    cache = m.new_cache(g)
    rows = [[m.forward(prompts[i % len(prompts)], cache, slot=i)[-1]] for i in range(g)]
    for _ in range(12):
        logits = m.forward_batch([(i, [int(rows[i][-1].argmax())]) for i in range(g)], cache)
        for i in range(g):
            rows[i].append(logits[i])
    for i in range(g):
        assert np.array_equal(np.array(rows[i]), alone(prompts[i % len(prompts)], 12)), i


def test_one_pass_mode_greedy(llama):
    """invariant=False: everything in one pass; greedy text on prompts without near-ties agrees."""
    sched = Scheduler(llama.model, llama.tokenizer, max_batch=12, max_queue=0, invariant=False)
    sched.start()
    try:
        ps = [params(llama, p, 20, temperature=0) for p in ["Once upon a time", "Lily", "The sun", "Tom"] * 3]
        assert_all_equal_reference(llama, sched, ps)
    finally:
        sched.stop(TIMEOUT_S)


def test_queue_limit_and_cancel_waiting(llama):
    sched = Scheduler(llama.model, llama.tokenizer, max_batch=2, max_queue=1)  # not started: nothing runs
    jobs = [sched.submit(params(llama, "a", 3), lambda e: None) for _ in range(3)]
    with pytest.raises(QueueFull):
        sched.submit(params(llama, "a", 3), lambda e: None)
    jobs[0].cancel()
    sched.submit(params(llama, "a", 3), lambda e: None)  # its place is free again
    assert sched.load() == (0, 3)


def test_cancel_running_and_stop(llama):
    sched = Scheduler(llama.model, llama.tokenizer, max_batch=1, max_queue=1)
    sched.start()
    first, second = queue.Queue(), queue.Queue()
    job = sched.submit(params(llama, "Tom", 400, temperature=0), first.put)
    first.get(timeout=TIMEOUT_S)
    job.cancel()  # frees the only slot: the next request runs
    sched.submit(params(llama, "Lily", 3, temperature=0), second.put)
    events, err = collect(second)
    assert err is None and events[-1].finish_reason in ("length", "stop")
    third = queue.Queue()

    def held(event):  # the scheduler thread stays in this callback until stop() has begun
        third.put(event)
        deadline = time.monotonic() + TIMEOUT_S
        while not sched._stop and time.monotonic() < deadline:
            time.sleep(0.001)

    sched.submit(params(llama, "Tom", 400, temperature=0), held)
    third.get(timeout=TIMEOUT_S)
    sched.stop(TIMEOUT_S)  # however fast the engine, the request is still running here
    events, err = collect(third)
    assert isinstance(err, Cancelled)
    assert sched.load() == (0, 0)


def test_stop_strings_cut_across_pieces():
    s = StopStrings(["END", "xyz"])
    assert s.push("abc E") == ("abc ", False)  # "E" might begin "END": held back
    assert s.push("N") == ("", False)
    assert s.push("D and more") == ("", True)
    s = StopStrings(["ab"])
    assert s.push("a") == ("", False)
    assert s.push("c") == ("ac", False)
    assert s.flush() == ""
    s = StopStrings(["zz", "b"])
    assert s.push("abczz") == ("a", True)  # the earliest stop string wins
    assert StopStrings([]).push("anything") == ("anything", False)


def test_scheduler_applies_stop_strings(llama):
    sched = Scheduler(llama.model, llama.tokenizer, max_batch=1, max_queue=0)
    sched.start()
    try:
        whole = "".join(t for _, t, _ in reference(llama, params(llama, "Once upon a time", 30, temperature=0)) if t)
        q = queue.Queue()
        sched.submit(params(llama, "Once upon a time", 30, temperature=0, stop=("Lily",)), q.put)
        events, _ = collect(q)
        assert "".join(e.text for e in events) == whole[:whole.index("Lily")]
        assert events[-1].finish_reason == "stop"
    finally:
        sched.stop(TIMEOUT_S)


def test_encode_dialog(llama):
    tok = llama.tokenizer
    bos, eos = llama.config.bos_id, llama.config.eos_id
    # one turn: exactly the tokens of run.c's chat mode
    assert encode_dialog(tok, [("system", "S"), ("user", "U")]) == tok.encode(render_llama2("U", "S"), bos=True)
    assert encode_dialog(tok, [("user", "U")]) == tok.encode(render_llama2("U"), bos=True)
    ids = encode_dialog(tok, [("system", "S"), ("user", "U1"), ("assistant", " A1 "), ("user", "U2")])
    first = tok.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 ", bos=True, eos=True)
    assert ids == first + tok.encode("[INST] U2 [/INST]", bos=True)
    assert ids[len(first) - 1] == eos and ids[len(first)] == bos
    chatml = encode_dialog(tok, [("user", "U")], template="chatml")
    assert chatml == tok.encode("<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n", bos=True)
    for bad, where in [([], "messages[0]"), ([("assistant", "A")], "messages[0]"),
                       ([("system", "S"), ("user", "U"), ("assistant", "A")], "messages[2]"),
                       ([("user", "U"), ("system", "S")], "messages[1]")]:
        with pytest.raises(ValueError) as e:
            encode_dialog(tok, bad)
        assert str(e.value).startswith(where + ":")


def test_a_failing_pass_fails_its_requests_only(llama):
    class Flaky:  # the real model, whose next pass raises once
        config = llama.model.config
        fail = False

        def new_cache(self, *args, **kw):
            return llama.model.new_cache(*args, **kw)

        def warm_up(self):
            llama.model.warm_up()

        def forward_batch(self, segments, cache, all_logits=False, adapters=None):
            if self.fail and len(segments[0][1]) == 1:  # fail at the first decode step
                self.fail = False
                raise RuntimeError("boom")
            return llama.model.forward_batch(segments, cache, all_logits, adapters)

    model = Flaky()
    sched = Scheduler(model, llama.tokenizer, max_batch=2, max_queue=2)
    sched.start()
    model.fail = True
    try:
        q = queue.Queue()
        sched.submit(params(llama, "Lily", 5, temperature=0), q.put)
        events, err = collect(q)
        assert isinstance(err, RuntimeError) and len(events) == 1
        sched.submit(params(llama, "Lily", 5, temperature=0), q.put)
        events, err = collect(q)
        assert err is None and len(events) == 6  # 5 tokens, then the end
        assert sched.load() == (0, 0)
    finally:
        sched.stop(TIMEOUT_S)


def test_a_grammar_that_gives_out_mid_answer_fails_only_its_request(llama, caplog):
    """A constraint passed in with the request is the one used (the scheduler builds none); when it
    fails mid-answer (a llguidance limit), that request gets the GrammarError, logged as one line
    without a traceback, and the others go on."""
    from llama2.structured import GrammarError

    class GivesOut:  # a matcher that allows every token for two steps, then fails
        def __init__(self):
            self.steps, self.done = 0, False

        def mask(self, logits):
            if self.steps == 2:
                raise GrammarError("structured output: Current row has 2007 items; max is 2000")
            return logits

        def advance(self, token):
            self.steps += 1

        def close(self):
            pass

    sched = Scheduler(llama.model, llama.tokenizer, max_batch=2, max_queue=2)
    sched.start()
    try:
        failing, fine = queue.Queue(), queue.Queue()
        sched.submit(params(llama, "Lily", 20, temperature=0), failing.put, GivesOut())
        sched.submit(params(llama, "Tom", 6, temperature=0), fine.put)
        events, error = collect(failing)
        assert isinstance(error, GrammarError) and len(events) == 2
        events, error = collect(fine)
        assert error is None and events[-1].finish_reason is not None
    finally:
        sched.stop()
    failures = [r for r in caplog.records if r.name == "llama2.server" and "2007 items" in r.getMessage()]
    assert failures and all(r.exc_info is None for r in failures)
