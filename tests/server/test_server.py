"""`llama2 serve` driven by the official openai client: completions and chat, streamed or not, and
seeded requests give the same bytes as `llama2 run` with the same settings."""

import io

import pytest

from conftest import asset
from server_helpers import metric, openai_fixture, serve_fixture

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL = "stories260K"


server = serve_fixture("--max-batch", "4")
client = openai_fixture()


def run_cli(*argv, stdin="") -> bytes:
    from llama2.cli import main
    out, err = io.BytesIO(), io.StringIO()
    code = main(["run", str(asset("stories260K.bin")), "-z", str(asset("tok512.bin")), *argv],
                stdout=out, stderr=err, stdin=io.StringIO(stdin))
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("prompt,seed,temperature,top_p,max_tokens", [
    ("Once upon a time", 42, 0.0, 0.9, 40),
    ("Once upon a time", 42, 1.0, 0.9, 60),
    ("Lily", 7, 0.8, 0.0, 50),
    ("", 3, 1.0, 0.5, 30),
])
def test_completion_equals_cli(client, llama, prompt, seed, temperature, top_p, max_tokens):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=seed,
                                  temperature=temperature, top_p=top_p)
    choice = r.choices[0]
    n = len(llama.encode(prompt))
    # run.c's -n counts positions: the prompt's n, then one per sampled token but the last
    cli = run_cli("-i", prompt, "-s", str(seed), "-t", str(temperature), "-p", str(top_p),
                  "-n", str(n + max_tokens - 1))
    assert cli == prompt.encode() + choice.text.encode() + b"\n"
    assert r.usage.prompt_tokens == n
    assert r.usage.completion_tokens <= max_tokens
    assert r.usage.total_tokens == n + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == max_tokens else "stop")


def test_completion_stream_equals_whole(client):
    args = dict(model=MODEL, prompt="The dog", max_tokens=40, seed=11, temperature=0.9)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(chunks) > 5  # streamed token by token, not in one piece


def test_completion_from_token_ids(client, llama):
    ids = llama.encode("Once upon a time")
    a = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    b = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == len(ids)


def test_stop_strings(client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0)
    text = whole.choices[0].text
    stop = " Lily"
    assert stop in text
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40,
                                    temperature=0, stop=["zzz", stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_max_tokens_capped_by_context(client, llama):
    seq_len = llama.config.seq_len
    ids = (llama.encode("Tom") * seq_len)[:seq_len - 2]  # 3 positions left to sample into
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=100, temperature=0)
    assert r.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=ids * 2, max_tokens=1)
    assert e.value.body["param"] == "prompt"
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("system,user,seed,temperature", [
    ("You are a storyteller.", "Tell me about a cat.", 5, 1.0),
    ("", "Hello", 9, 0.0),
])
def test_chat_equals_cli(client, llama, system, user, seed, temperature):
    from llama2.chat import encode_dialog
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    n = len(encode_dialog(llama.tokenizer, [(m["role"], m["content"]) for m in messages]))
    max_tokens = 40
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, seed=seed,
                                       temperature=temperature, top_p=0.9)
    reply = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    cli = run_cli("-m", "chat", "-y", system, "-i", user, "-s", str(seed), "-t", str(temperature),
                  "-p", "0.9", "-n", str(n + max_tokens - 1))
    assert cli.startswith(b"Assistant: " + reply.encode() + b"\n")
    assert r.usage.prompt_tokens == n


def test_chat_stream_and_multi_turn(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "A story?"}]
    args = dict(model=MODEL, messages=messages, max_tokens=30, seed=1, temperature=0.7)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_health_and_metrics(server, client):
    client.completions.create(model=MODEL, prompt="A", max_tokens=3, temperature=0)
    with httpx.Client() as http:
        assert http.get(server.base + "/health").json()["status"] == "ok"
        page = http.get(server.base + "/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert metric(text, "llama2_generated_tokens_total") >= 3
    assert metric(text, 'llama2_requests_total{endpoint="completions",outcome="ok"}') >= 1
    for name in ("llama2_queue_depth", "llama2_batch_size", "llama2_tokens_per_second"):
        assert f"# TYPE {name} gauge" in text
