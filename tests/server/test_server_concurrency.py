"""Continuous batching seen from outside: 32 clients send 4 requests each at once; every request is
answered exactly once, and each greedy answer equals the same request run alone (generate())."""

import threading

import pytest

from conftest import asset
from server_helpers import Server, metric

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "stories260K"
CLIENTS, PER_CLIENT = 32, 4
# The scheduler keeps each request's logits bit-identical to the request alone, so equality is
# exact; these prompts also have no near-ties among their first 40 greedy tokens (top-2 logit gap
# > 1e-3), which keeps this test meaningful for --one-pass too.
PROMPTS = ["Once upon a time", "The cat", "Lily", "Tom", "The sun", "A little bird", "Sam and Max",
           "One day", "The dog", "Mom said", "Ben", "Sue liked", "There was a", "The big tree"]


def request_for(client_id, k):
    i = client_id * PER_CLIENT + k
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8 + (i * 7) % 33, "stream": i % 2 == 1}


def alone(llama, prompt, max_tokens):
    from llama2.generate import generate
    from llama2.sampler import Sampler
    ids = llama.encode(prompt)
    events = list(generate(llama.model, llama.tokenizer, Sampler(llama.config.vocab_size, 0.0),
                           ids, len(ids) + max_tokens - 1))
    return "".join(e.text for e in events if not e.is_prompt), events[-1].finish_reason


@pytest.mark.slow
def test_32_clients_4_requests_each():
    from llama2 import Llama
    llama = Llama.load(asset("stories260K.bin"), asset("tok512.bin"))
    server = Server("--max-batch", "16", "--max-queue", "128")
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        results, errors, lock = {}, [], threading.Lock()
        start = threading.Barrier(CLIENTS)

        def worker(cid):
            start.wait(60)
            for k in range(PER_CLIENT):
                req = request_for(cid, k)
                try:
                    args = dict(model=MODEL, prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=0)
                    if req["stream"]:
                        chunks = list(client.completions.create(**args, stream=True))
                        got = ("".join(c.choices[0].text for c in chunks),
                               [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][-1],
                               {c.id for c in chunks})
                    else:
                        r = client.completions.create(**args)
                        got = (r.choices[0].text, r.choices[0].finish_reason, {r.id})
                except Exception as e:  # collected, reported below
                    with lock:
                        errors.append(f"{cid}/{k}: {e!r}")
                    continue
                with lock:
                    assert (cid, k) not in results
                    results[(cid, k)] = got

        threads = [threading.Thread(target=worker, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors[:5]
        assert len(results) == CLIENTS * PER_CLIENT
        ids = [i for _, _, idset in results.values() for i in idset]
        assert all(len(idset) == 1 for _, _, idset in results.values())
        assert len(set(ids)) == len(ids)  # no answer was delivered twice
        expected = {}
        for (cid, k), (text, finish, _) in sorted(results.items()):
            req = request_for(cid, k)
            key = (req["prompt"], req["max_tokens"])
            if key not in expected:
                expected[key] = alone(llama, *key)
            assert (text, finish) == expected[key], (cid, k, req)
        with httpx.Client() as http:
            page = http.get(server.base + "/metrics").text
        assert metric(page, 'llama2_requests_total{endpoint="scheduler",outcome="ok"}') == CLIENTS * PER_CLIENT
        # batching happened: fewer forward passes than tokens generated
        assert metric(page, "llama2_steps_total") < metric(page, "llama2_generated_tokens_total")
    finally:
        assert server.terminate() == 0, server.stderr
