"""The llama-cpp-python-shaped Python API: Llama.create_completion / create_chat_completion return
OpenAI-shaped dicts and chunks; stop strings cut exactly; logprobs are the log-softmax of the logits."""

import numpy as np
import pytest

from llama2 import request
from llama2.completions import RequestError, chat_params, completion_params
from llama2.generate import complete, log_softmax

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "You are a storyteller."}, {"role": "user", "content": "Tell me a story."}]


def test_completion_shape_and_run_c_text(llama):
    n = len(llama.encode(PROMPT))
    for seed, k in ((42, 30), (7, 1)):
        r = llama.create_completion(PROMPT, max_tokens=k, seed=seed, temperature=1.0, top_p=0.9)
        assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
        assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == "stories260K"
        choice = r["choices"][0]
        assert choice["index"] == 0 and choice["logprobs"] is None
        # the same loop as run.c's generate: the same text for positions n .. n+k-1
        run_c = "".join(llama.generate(PROMPT, steps=n + k - 1, temperature=1.0, top_p=0.9, seed=seed))
        assert choice["text"] == run_c
        finish = choice["finish_reason"]
        assert finish == "length" or (finish == "stop" and r["usage"]["completion_tokens"] < k)
        assert r["usage"] == {"prompt_tokens": n, "completion_tokens": r["usage"]["completion_tokens"],
                              "total_tokens": n + r["usage"]["completion_tokens"],
                              "prompt_tokens_details": {"cached_tokens": 0}}  # the API keeps no prefix cache
    r = llama.create_completion(PROMPT, max_tokens=5, seed=1, echo=True)
    assert r["choices"][0]["text"].startswith(PROMPT)


def test_max_tokens_defaults(llama):
    r = llama.create_completion("Lily", seed=3, temperature=0)
    assert r["usage"]["completion_tokens"] <= 16  # OpenAI's default for completions
    r = llama.create_chat_completion(CHAT, seed=3, max_tokens=None)  # the rest of the context
    assert r["choices"][0]["finish_reason"] == "stop" or r["usage"]["total_tokens"] == llama.config.seq_len + 1


def test_streams_equal_whole_answers(llama):
    whole = llama.create_completion(PROMPT, max_tokens=40, seed=9, logprobs=2)
    chunks = list(llama.create_completion(PROMPT, max_tokens=40, seed=9, logprobs=2, stream=True,
                                          include_usage=True))
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    streamed = [v for c in chunks[:-1] if c["choices"][0]["logprobs"]
                for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == whole["choices"][0]["logprobs"]["token_logprobs"]

    whole = llama.create_chat_completion(CHAT, max_tokens=40, seed=9)
    chunks = list(llama.create_chat_completion(CHAT, max_tokens=40, seed=9, stream=True))
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["message"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stop_strings_cut_exactly(llama, seed):
    full = llama.create_completion(PROMPT, max_tokens=80, seed=seed)["choices"][0]["text"]
    assert len(full) > 40
    cases = [[full[20:24]], [full[5:6]], [full[30:37], full[12:15]], [full[-3:]], ["no such text!"],
             [full[:1]]]
    for stop in cases:
        hits = [full.find(s) for s in stop if full.find(s) >= 0]
        expected = full[:min(hits)] if hits else full
        r = llama.create_completion(PROMPT, max_tokens=80, seed=seed, stop=stop)
        choice = r["choices"][0]
        assert choice["text"] == expected, stop
        assert choice["finish_reason"] == ("stop" if hits else "length")
        chunks = list(llama.create_completion(PROMPT, max_tokens=80, seed=seed, stop=stop, stream=True))
        pieces = [c["choices"][0]["text"] for c in chunks]
        assert "".join(pieces) == expected
        assert not any(s in "".join(pieces) for s in stop)
    chat = llama.create_chat_completion(CHAT, max_tokens=60, seed=seed)["choices"][0]["message"]["content"]
    if len(chat) > 12:
        r = llama.create_chat_completion(CHAT, max_tokens=60, seed=seed, stop=chat[8:12])
        assert r["choices"][0]["message"]["content"] == chat[:chat.find(chat[8:12])]


def _teacher_forced(llama, params, temperature_free=True):
    """(events, log-softmax rows of the teacher-forced logits for each sampled token)."""
    events = [e for e in complete(llama.model, params, llama.tokenizer) if e.token is not None]
    ids = list(params.prompt) + [e.token for e in events]
    rows = llama.logits(ids)[len(params.prompt) - 1:len(ids) - 1]
    return events, [log_softmax(r) for r in rows]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0])
def test_completion_logprobs_are_log_softmax_of_logits(llama, temperature):
    body = request.validate(request.CompletionBody, dict(prompt=PROMPT, max_tokens=24, temperature=temperature,
                                                          top_p=0.9, seed=11, logprobs=3))
    params, _ = completion_params(llama.tokenizer, llama.config, body)
    events, rows = _teacher_forced(llama, params)
    assert events
    for e, lp in zip(events, rows):
        assert e.logprob.logprob == pytest.approx(lp[e.token], abs=1e-4)
        best = np.argsort(-lp, kind="stable")[:3]
        assert [t for t, _ in e.logprob.top] == best.tolist()
        assert np.allclose([v for _, v in e.logprob.top], lp[best], atol=1e-4)
    r = llama.create_completion(PROMPT, max_tokens=24, temperature=temperature, seed=11, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [e.logprob.logprob for e in events]
    assert lp["tokens"] == [llama.tokenizer.piece(e.logprob.prev, e.token).decode() for e in events]
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for top, e in zip(lp["top_logprobs"], events):
        assert len(top) == 3 and sorted(top.values(), reverse=True) == [v for _, v in e.logprob.top]


def test_chat_logprobs_are_log_softmax_of_logits(llama):
    body = request.validate(request.ChatBody, dict(messages=CHAT, max_tokens=20, seed=5, logprobs=True,
                                                   top_logprobs=2))
    params = chat_params(llama.tokenizer, llama.config, body)
    events, rows = _teacher_forced(llama, params)
    r = llama.create_chat_completion(CHAT, max_tokens=20, seed=5, logprobs=True, top_logprobs=2)
    content = r["choices"][0]["logprobs"]["content"]
    assert r["choices"][0]["logprobs"]["refusal"] is None
    assert len(content) == len(events) == r["usage"]["completion_tokens"]
    for item, e, lp in zip(content, events, rows):
        assert item["logprob"] == pytest.approx(lp[e.token], abs=1e-4)
        assert bytes(item["bytes"]) == llama.tokenizer.piece(e.logprob.prev, e.token)
        assert item["token"] == bytes(item["bytes"]).decode("utf-8", errors="replace")
        assert len(item["top_logprobs"]) == 2
        assert [t["logprob"] for t in item["top_logprobs"]] == pytest.approx(sorted(lp)[::-1][:2], abs=1e-4)
    assert "".join(i["token"] for i in content) == r["choices"][0]["message"]["content"]
    r = llama.create_chat_completion(CHAT, max_tokens=5, seed=5, logprobs=True)
    assert all(i["top_logprobs"] == [] for i in r["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize("call,kwargs,param", [
    ("create_completion", {"temperature": -1}, "temperature"),
    ("create_completion", {"top_p": 1.5}, "top_p"),
    ("create_completion", {"max_tokens": 0}, "max_tokens"),
    ("create_completion", {"logprobs": 6}, "logprobs"),
    ("create_completion", {"stop": [1]}, "stop"),
    ("create_completion", {"prompt": "word " * 600}, "prompt"),
    ("create_completion", {"prompt": [1, 9999]}, "prompt"),
    ("create_chat_completion", {"top_logprobs": 2}, "top_logprobs"),
    ("create_chat_completion", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("create_chat_completion", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("create_chat_completion", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("create_chat_completion", {"messages": CHAT + [{"role": "assistant", "content": "x"}]}, "messages[2]"),
])
def test_bad_arguments_name_the_field(llama, call, kwargs, param):
    kwargs = dict(kwargs)
    first = kwargs.pop("prompt", PROMPT) if call == "create_completion" else kwargs.pop("messages", CHAT)
    with pytest.raises(RequestError) as e:
        getattr(llama, call)(first, **kwargs)
    assert e.value.param == param and str(e.value).startswith(param + ": ")
