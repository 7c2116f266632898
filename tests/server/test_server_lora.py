"""LoRA adapters in the server: `llama2 serve --lora NAME=DIR` lists each adapter in /v1/models, a
request's `model` field picks one (an unknown name is OpenAI's 404), requests with two adapters and
the base share one batch and each gets what it gets alone (and what the Python API gives with that
adapter), and the prefix index never hands one adapter's keys and values to another."""

import dataclasses
import io
import queue
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import asset, random_adapter
from server_helpers import RecordingModel, Server
from test_server_scheduler import TIMEOUT_S, collect, params, reference

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "stories260K"
NAMES = ("ft", "rnd")
PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play with her friends"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama):
    root = tmp_path_factory.mktemp("adapters")
    return {"ft": random_adapter(root / "ft", llama.config, seed=1, scale=0.2),
            "rnd": random_adapter(root / "rnd", llama.config, rank=2, seed=2, scale=0.2) / "adapter.gguf"}


@pytest.fixture(scope="module")
def server(adapters):
    s = Server("--max-batch", "4", "--no-prefix-cache", *[f for name in NAMES for f in
                                                           ("--lora", f"{name}={adapters[name]}")])
    yield s
    assert s.terminate() == 0, s.stderr


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_base_and_its_adapters(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, *NAMES]
    listed = httpx.get(server.url + "/models").json()["data"]
    assert [m.get("parent") for m in listed] == [None, MODEL, MODEL]
    assert httpx.get(server.url + "/models/ft").json()["id"] == "ft"


def test_an_unknown_model_is_a_404_naming_the_served_ones(server):
    r = httpx.post(server.url + "/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and all(repr(n) in error["message"] for n in (MODEL, *NAMES))


def test_two_adapters_and_the_base_in_one_batch_equal_each_alone(client, adapters):
    """Greedy with log probabilities: each model's answer is the same sent alone or with the other
    two at once (one batch: --max-batch 4), and equals the Python API's with that adapter."""
    from llama2 import Llama

    def ask(model):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=3)
        assert r.model == model
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs

    models = [MODEL, *NAMES]
    alone = [ask(m) for m in models]
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(ask, models * 2))
    assert together == alone * 2
    assert len({logprobs[0] for _, logprobs in alone}) == 3  # the adapters change the model
    for model, (text, logprobs) in zip(models, alone):
        llama = Llama.load(asset("stories260K.bin"), asset("tok512.bin"),
                           lora=adapters[model] if model != MODEL else None)
        api = llama.create_completion(PROMPT, max_tokens=24, temperature=0, logprobs=3)["choices"][0]
        assert (api["text"], api["logprobs"]["token_logprobs"]) == (text, logprobs), model


def test_the_scheduler_runs_them_in_one_pass_and_keeps_their_prefixes_apart(llama, adapters):
    """In-process: four requests (two adapters, the base) submitted together share the first pass;
    each equals generate() on a model loaded with its adapter alone. Then the prefix index: a
    request repeating an adapter's prompt reuses its blocks; with the other adapter it reuses none."""
    from llama2 import Llama
    from llama2.server.scheduler import Scheduler

    served = Llama.load(asset("stories260K.bin"), asset("tok512.bin"), adapters=adapters)

    model = RecordingModel(served.model)
    sched = Scheduler(model, served.tokenizer, max_batch=4, max_queue=4)
    ps = [params(served, PROMPT, 12, seed=5, adapter=0), params(served, PROMPT, 12, seed=5),
          params(served, "Tom had a ball", 10, seed=6, temperature=0.0, adapter=1),
          params(served, "Lily", 8, seed=7, adapter=0)]
    queues = [queue.Queue() for _ in ps]
    for p, q in zip(ps, queues):
        sched.submit(p, q.put)
    sched.start()
    try:
        alone = [Llama.load(asset("stories260K.bin"), asset("tok512.bin"),
                            lora=None if p.adapter < 0 else adapters[NAMES[p.adapter]]) for p in ps]
        for p, q, own in zip(ps, queues, alone):
            events, err = collect(q)
            assert err is None
            assert [(e.token, e.text, e.finish_reason) for e in events] == reference(own, p)
        assert model.adapters[0] == [0, -1, 1, 0]  # every request's prompt in the first pass
        # the first prompt again, with its adapter and with the other one
        again = [dataclasses.replace(ps[0], adapter=a) for a in (0, 1)]
        queues = [queue.Queue() for _ in again]
        jobs = [sched.submit(p, q.put) for p, q in zip(again, queues)]
        for q in queues:
            assert collect(q)[1] is None
        assert jobs[0].reused > 0 and jobs[1].reused == 0
    finally:
        sched.stop(TIMEOUT_S)


def test_bad_lora_flags_get_one_line(tmp_path, adapters):
    from llama2.cli import main

    def serve(*flags):
        err = io.StringIO()
        code = main(["serve", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), "--port", "0",
                     *map(str, flags)], stdout=io.BytesIO(), stderr=err, stdin=io.StringIO(""))
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, lines
        return code, lines[0]

    code, line = serve("--lora", f"ft={tmp_path / 'missing'}")
    assert code == 2 and "--lora" in line and "missing" in line
    code, line = serve("--lora", f"ft={adapters['ft']}", "--lora", f"ft={adapters['rnd']}")
    assert code == 2 and "'ft'" in line and "taken" in line
    code, line = serve("--lora", f"{MODEL}={adapters['ft']}")
    assert code == 2 and "base model" in line
    from llama2 import Llama
    other = random_adapter(tmp_path / "other", Llama.load(asset("kquant/rand256-q8_0.gguf")).config)
    code, line = serve("--lora", f"x={other}")
    assert code == 1 and str(other) in line and "another model" in line
