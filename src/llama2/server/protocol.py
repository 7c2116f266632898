"""OpenAI API shapes: request bodies validated into scheduler Params, and response objects.

Reference: the OpenAI API reference for /v1/completions and /v1/chat/completions (legacy text
completions and chat completions; `n`, logprobs and tools are not supported and are refused).
Every error names the field at fault, as OpenAI's error object does (`param`).
Sampling defaults are the CLI's (config.GENERATION), so a request and `llama2 run` with the same
settings agree; a request without a seed gets a random one.
"""

import math
import secrets
import time
import uuid
from dataclasses import dataclass

from ..chat import ROLES, encode_dialog, reply_end_ids
from ..config import GENERATION
from .scheduler import Params

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str = None, code: str = None,
                 type: str = None, headers: dict = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class Request:
    """A validated request: what to generate and how to answer."""
    params: Params
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False  # completions: the prompt text comes first in the answer
    prompt_text: str = ""


# -- field readers --------------------------------------------------------------------------------

def _number(body, name, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise bad(name, f"expected a finite number, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(name, f"{v} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return float(v)


def _integer(body, name, default=None, lo=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"expected an integer, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise bad(name, f"must be at least {lo}, got {v}")
    return v


def _boolean(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"expected true or false, got {type(v).__name__}")
    return v


def _stop(body) -> tuple:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "expected a string or a list of strings")
    if len(v) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
    return tuple(s for s in v if s)


def _unsupported(body):
    """Refuse options that would change the answer but are not implemented."""
    if _integer(body, "n", 1, lo=1) != 1:
        raise bad("n", "only n=1 is supported; send one request per completion")
    if _integer(body, "best_of", 1, lo=1) != 1:
        raise bad("best_of", "only best_of=1 is supported")
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs", "log probabilities are not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise bad(name, "penalties are not supported")
    if body.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(name, "tool and function calls are not supported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format", "only {\"type\": \"text\"} is supported")
    if body.get("suffix"):
        raise bad("suffix", "suffix (insertion) is not supported")


def check_model(body, served: str):
    model = body.get("model")
    if model is None:
        raise APIError(400, "model: required (GET /v1/models lists it)", param="model",
                       code="missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"expected a string, got {type(model).__name__}")
    if model != served:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _sampling(body, prompt, max_tokens_default, seq_len, prompt_field, **extra) -> Params:
    n = len(prompt)
    left = seq_len - n + 1  # run.c: positions 0..steps-1 with steps <= seq_len
    if left < 1:
        raise APIError(400, f"{prompt_field}: {n} prompt tokens exceed the model's context of {seq_len}",
                       param=prompt_field, code="context_length_exceeded")
    max_tokens = _integer(body, "max_completion_tokens", None, lo=1)
    max_tokens = _integer(body, "max_tokens", max_tokens, lo=1)
    max_tokens = min(max_tokens or max_tokens_default or left, left)
    temperature = _number(body, "temperature", GENERATION.temperature, lo=0)
    top_p = _number(body, "top_p", GENERATION.top_p, lo=0, hi=1)
    seed = _integer(body, "seed")
    if seed is None or seed <= 0:  # run.c would seed from the clock: concurrent requests must not share
        seed = secrets.randbits(63) or 1
    return Params(prompt=tuple(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  seed=seed, stop=_stop(body), **extra)


def _stream(body) -> tuple:
    stream = _boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "expected an object")
    return stream, _boolean(options, "include_usage") if stream else False


# -- requests -------------------------------------------------------------------------------------

def parse_completion(body: dict, tokenizer, config) -> Request:
    """POST /v1/completions: `prompt` is a string or a list of token ids (used as given)."""
    _unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids, text = tokenizer.encode(prompt, bos=True), prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise bad("prompt", f"token ids must be in [0, {config.vocab_size})")
        ids, text = prompt, tokenizer.decode(prompt)
    elif prompt is None:
        raise APIError(400, "prompt: required", param="prompt", code="missing_required_parameter")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", "one prompt per request (a list of prompts is not supported)")
    else:
        raise bad("prompt", "expected a string or a non-empty list of token ids")
    stream, usage = _stream(body)
    params = _sampling(body, ids, COMPLETION_MAX_TOKENS, config.seq_len, "prompt",
                       stop_tokens=frozenset((config.bos_id, config.eos_id)))
    return Request(params, stream, usage, echo=_boolean(body, "echo"), prompt_text=text)


def _content(i, message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}]", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content", "expected a string or a list of text parts")


def parse_chat(body: dict, tokenizer, config, template: str) -> Request:
    """POST /v1/chat/completions: messages rendered with the chat template; a system and a user
    message give exactly the tokens (and, seeded, the text) of `llama2 run -m chat -y SYS -i USER`."""
    _unsupported(body)
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages: required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "expected an object with role and content")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        pairs.append((role, _content(i, m)))
    try:
        ids = encode_dialog(tokenizer, pairs, template)
    except ValueError as e:
        param = str(e).split(":", 1)[0]
        raise APIError(400, str(e), param=param, code="invalid_value") from None
    stream, usage = _stream(body)
    # run.c's chat mode: EOS (or the template's end marker) ends the reply; it draws a coin at every
    # prompt position but the last.
    params = _sampling(body, ids, None, config.seq_len, "messages",
                       stop_tokens=reply_end_ids(tokenizer, template, config.eos_id), skip_coins=len(ids) - 1)
    return Request(params, stream, usage)


# -- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id, model, text, finish_reason, use) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def completion_chunk(id, model, text, finish_reason=None) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_completion(id, model, text, finish_reason, use) -> dict:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(id, model, delta, finish_reason=None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(id, model, object, use) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": [],
            "usage": use}
