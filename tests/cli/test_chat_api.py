"""Chat completions in the Python API: replies end at every end token the model declares (BOS for
llama2.c vocabularies, as run.c's generate stops), and a history longer than the context loses its
oldest turns, the system prompt kept, unless refused."""

import pytest

from chat_template_cases import long_chat
from conftest import asset
from llama2 import Llama
from llama2.chat import encode_dialog
from llama2.completions import RequestError


@pytest.fixture(scope="module")
def llama():
    return Llama.load(asset("stories260K.bin"), asset("tok512.bin"))


def test_replies_stop_at_bos_and_never_print_it(llama):
    assert llama.tokenizer.bos_id in llama.tokenizer.end_ids
    finishes = []
    for seed in range(1, 16):
        r = llama.create_chat_completion([{"role": "user", "content": "Tell me a story."}], seed=seed,
                                         temperature=1.0, max_tokens=400)
        assert "<s>" not in r["choices"][0]["message"]["content"]
        finishes.append(r["choices"][0]["finish_reason"])
    assert "stop" in finishes


def test_long_chat_drops_oldest_turns_keeps_system(llama):
    messages = long_chat()
    pairs = [(m["role"], m["content"]) for m in messages]
    seq_len = llama.config.seq_len
    assert len(encode_dialog(llama.tokenizer, pairs)) > seq_len  # the whole history does not fit
    r = llama.create_chat_completion(messages, seed=3, max_tokens=50)
    dropped = r["usage"]["dropped_messages"]
    assert dropped > 0 and dropped % 2 == 0
    kept = pairs[:1] + pairs[1 + dropped:]
    prompt = encode_dialog(llama.tokenizer, kept)
    assert r["usage"]["prompt_tokens"] == len(prompt) <= seq_len - 50
    # the fewest dropped: two more messages would not have left 50 positions
    assert len(encode_dialog(llama.tokenizer, pairs[:1] + pairs[dropped - 1:])) > seq_len - 50
    short = llama.create_chat_completion(messages[-1:], max_tokens=5)
    assert "dropped_messages" not in short["usage"]


def test_long_chat_refused_on_request(llama):
    with pytest.raises(RequestError, match="exceed the model's context") as e:
        llama.create_chat_completion(long_chat(), max_tokens=50, drop_turns=False)
    assert e.value.code == "context_length_exceeded"
