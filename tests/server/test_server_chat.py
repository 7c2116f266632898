"""The server keeps a long chat going: the oldest turns are left out (system prompt kept) and the
usage says how many; `--refuse-long-chats` answers today's 400 instead."""

import pytest

from server_helpers import Server
from chat_template_cases import long_chat

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def chat(server, messages, **extra):
    body = {"model": "stories260K", "messages": messages, "max_tokens": 40, "seed": 2, **extra}
    return httpx.post(server.url + "/chat/completions", json=body, timeout=120)


def test_long_chats_drop_old_turns_or_are_refused():
    from llama2 import Llama
    from conftest import asset
    llama = Llama.load(asset("stories260K.bin"), asset("tok512.bin"))
    want = llama.create_chat_completion(long_chat(), max_tokens=40, seed=2)
    server = Server()
    try:
        r = chat(server, long_chat())
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}  # the server's first request
        assert usage == want["usage"] and want["usage"]["dropped_messages"] > 0
        assert r.json()["choices"][0]["message"] == want["choices"][0]["message"]
        chunks = chat(server, long_chat(), stream=True, stream_options={"include_usage": True}).text
        assert f'"dropped_messages":{want["usage"]["dropped_messages"]}' in chunks.replace(" ", "")
    finally:
        assert server.terminate() == 0
    server = Server("--refuse-long-chats")
    try:
        r = chat(server, long_chat())
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "messages"
    finally:
        assert server.terminate() == 0
