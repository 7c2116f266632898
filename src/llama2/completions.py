"""OpenAI-shaped completions, shared by the Python API (Llama.create_completion and
create_chat_completion) and the server: arguments become generate.Params, generation Events
become response dicts and stream chunks. One code path, so a seeded request gives the same
answer from either.

Shapes: the OpenAI API reference for legacy completions (`text_completion`, logprobs as
tokens / token_logprobs / top_logprobs / text_offset) and chat completions (`chat.completion`,
`chat.completion.chunk`, logprobs as content[{token, logprob, bytes, top_logprobs}]).
"""

import json
import re
import secrets
import time
import uuid

from .chat import ROLES, encode_dialog, reply_end_ids
from .chat_template import TemplateError
from .config import GENERATION
from .errors import Llama2Error
from .generate import Event, Params

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the context left
MAX_LOGPROBS = 5  # completions: `logprobs` at most (as OpenAI)
MAX_TOP_LOGPROBS = 20  # chat: `top_logprobs` at most (as OpenAI)
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class RequestError(Llama2Error):
    """An argument or request field that cannot be served: names the field (`param`), as
    OpenAI's error object does. The server answers it with a 400."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{param}: {message}")
        self.param, self.code = param, code


# -- arguments -> Params --------------------------------------------------------------------------

def _number(name, v, lo=None, hi=None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise RequestError(name, f"expected a number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(name, f"{v} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return float(v)


def _integer(name, v, lo=None, hi=None):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(name, f"expected an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(name, f"{v} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return v


def stop_strings(stop) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop", "expected a string or a list of strings")
    return tuple(s for s in stop if s)


def response_format_spec(fmt):
    """OpenAI's `response_format` -> a structured.Spec, or None for plain text.

    {"type": "text"}; {"type": "json_object"} (any JSON object; llama-cpp-python's "schema" key
    beside it is honoured); {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}.
    """
    from .structured import Spec
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise RequestError("response_format", f"expected an object, got {type(fmt).__name__}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        if fmt.get("schema") is not None:
            return Spec("json_schema", _schema("response_format.schema", fmt["schema"]), strict=True)
        return Spec("json_object")
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise RequestError("response_format.json_schema", "required: an object with name and schema")
        name = js.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise RequestError("response_format.json_schema.name",
                               "required: 1 to 64 letters, digits, underscores or dashes")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError("response_format.json_schema.strict", "expected true or false")
        if "schema" not in js:
            raise RequestError("response_format.json_schema.schema", "required: a JSON schema")
        return Spec("json_schema", _schema("response_format.json_schema.schema", js["schema"]),
                    strict=bool(strict))
    raise RequestError("response_format.type",
                       f"expected 'text', 'json_object' or 'json_schema', got {kind!r}")


def _schema(param, schema):
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise RequestError(param, f"not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError(param, f"expected a JSON schema object, got {type(schema).__name__}")
    return schema


def compile_grammar(spec, tokenizer, vocab_size, param="response_format"):
    """A structured.Spec compiled for this vocabulary; RequestError naming `param` if it cannot be."""
    from .structured import Grammar, GrammarError
    if spec is None:
        return None
    try:
        return Grammar.compile(spec, tokenizer, vocab_size)
    except GrammarError as e:
        raise RequestError(param, f"cannot be compiled: {e}") from None


def _grammar(tokenizer, config, response_format, grammar):
    """The grammar of a request: `grammar` (a structured.Spec or Grammar) or `response_format`."""
    from .structured import Grammar, Spec
    if grammar is not None and response_format is not None and response_format_spec(response_format):
        raise RequestError("grammar", "give either grammar or response_format, not both")
    if isinstance(grammar, Grammar):
        return grammar
    if grammar is not None:
        if not isinstance(grammar, Spec):
            raise RequestError("grammar", "expected a llama2.structured.Spec or Grammar")
        return compile_grammar(grammar, tokenizer, config.vocab_size, "grammar")
    return compile_grammar(response_format_spec(response_format), tokenizer, config.vocab_size)


def _params(prompt, field, seq_len, max_tokens, default_max, temperature, top_p, seed, stop,
            **extra) -> Params:
    n = len(prompt)
    left = seq_len - n + 1  # run.c: positions 0..steps-1 with steps <= seq_len
    if left < 1:
        raise RequestError(field, f"{n} prompt tokens exceed the model's context of {seq_len}",
                           code="context_length_exceeded")
    max_tokens = _integer("max_tokens", max_tokens, lo=1)
    max_tokens = min(max_tokens or default_max or left, left)
    temperature = _number("temperature", GENERATION.temperature if temperature is None else temperature, lo=0)
    top_p = _number("top_p", GENERATION.top_p if top_p is None else top_p, lo=0, hi=1)
    seed = _integer("seed", seed)
    if seed is None or seed <= 0:  # run.c would seed from the clock: concurrent requests must not share
        seed = secrets.randbits(63) or 1
    return Params(prompt=tuple(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  seed=seed, stop=stop_strings(stop), **extra)


def completion_params(tokenizer, config, prompt, max_tokens=COMPLETION_MAX_TOKENS, temperature=None,
                      top_p=None, seed=None, stop=None, logprobs=None, response_format=None,
                      grammar=None) -> tuple:
    """(Params, prompt text) of a completion. `prompt` is a string (encoded with BOS) or a list of
    token ids used as given; generation stops at BOS or EOS, as run.c's."""
    if isinstance(prompt, str):
        ids, text = tokenizer.encode(prompt, bos=True), prompt
    elif (isinstance(prompt, (list, tuple)) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise RequestError("prompt", f"token ids must be in [0, {config.vocab_size})")
        ids, text = list(prompt), tokenizer.decode(prompt)
    else:
        raise RequestError("prompt", "expected a string or a non-empty list of token ids")
    logprobs = _integer("logprobs", logprobs, lo=0, hi=MAX_LOGPROBS)
    params = _params(ids, "prompt", config.seq_len, max_tokens, COMPLETION_MAX_TOKENS, temperature,
                     top_p, seed, stop, stop_tokens=frozenset({config.bos_id, config.eos_id} | tokenizer.end_ids),
                     logprobs=logprobs, grammar=_grammar(tokenizer, config, response_format, grammar))
    return params, text


def message_pairs(messages) -> list:
    """OpenAI chat messages -> (role, text) pairs; "developer" is "system"; text parts joined."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages", "expected a non-empty list of messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]", "expected an object with role and content")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            parts = []
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or part.get("type") != "text"
                        or not isinstance(part.get("text"), str)):
                    raise RequestError(f"messages[{i}].content[{j}]", "only text content parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content", "expected a string or a list of text parts")
        pairs.append((role, content))
    return pairs


def fit_dialog(tokenizer, pairs, template, seq_len: int, reserve: int) -> tuple:
    """(ids, dropped): the dialog's ids; when they do not fit the context, the oldest exchanges
    (a user message and the reply after it) are left out, the system prompt and the last message
    kept, until `reserve` positions are left for the reply (ollama keeps long chats going so)."""
    ids = encode_dialog(tokenizer, pairs, template)
    if len(ids) <= seq_len:
        return ids, 0
    system = [p for p in pairs[:1] if p[0] == "system"]
    rest, dropped = pairs[len(system):], 0
    while len(ids) > seq_len - reserve and len(rest) > 1:
        n = 2 if len(rest) > 2 and rest[1][0] == "assistant" else 1
        rest, dropped = rest[n:], dropped + n
        ids = encode_dialog(tokenizer, system + rest, template)
    return ids, dropped


def chat_params(tokenizer, config, messages, template="llama2", max_tokens=None, temperature=None,
                top_p=None, seed=None, stop=None, logprobs=False, top_logprobs=None,
                response_format=None, grammar=None, drop_turns=True) -> Params:
    """Params of a chat completion: the messages rendered with the chat template; a system and a
    user message give exactly the tokens (and, seeded, the text) of `llama2 run -m chat -y SYS -i USER`.
    A history that does not fit the context loses its oldest turns (`drop_turns`; the count is
    Params.dropped_messages) or, with drop_turns=False, is refused."""
    try:
        pairs = message_pairs(messages)
        reserve = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else config.seq_len // 4
        ids, dropped = (fit_dialog(tokenizer, pairs, template, config.seq_len, min(reserve, config.seq_len // 2))
                        if drop_turns else (encode_dialog(tokenizer, pairs, template), 0))
    except ValueError as e:
        raise RequestError(str(e).split(":", 1)[0], str(e).split(": ", 1)[-1]) from None
    except TemplateError as e:  # the model's template refuses these messages
        raise RequestError("messages", str(e)) from None
    if not isinstance(logprobs, bool) and logprobs is not None:
        raise RequestError("logprobs", f"expected true or false, got {logprobs!r}")
    top_logprobs = _integer("top_logprobs", top_logprobs, lo=0, hi=MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise RequestError("top_logprobs", "needs logprobs: true")
    # run.c's chat mode: EOS (or the template's end marker) ends the reply; it draws a coin at every
    # prompt position but the last.
    stop_tokens = reply_end_ids(tokenizer, template, config.eos_id)
    return _params(ids, "messages", config.seq_len, max_tokens, None, temperature, top_p, seed, stop,
                   stop_tokens=stop_tokens, skip_coins=len(ids) - 1, dropped_messages=dropped,
                   logprobs=(top_logprobs or 0) if logprobs else None,
                   grammar=_grammar(tokenizer, config, response_format, grammar))


# -- Events -> responses --------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Answer:
    """One request's answer, built from its Events: `start()` and `push(event)` return the stream
    chunks, `usage_chunk()` the optional last one, `result()` the whole response afterwards.

    `chat`: a chat.completion (else a text_completion); `prefix`: text that comes before the
    generated text (a completion's echoed prompt).
    """

    def __init__(self, chat: bool, model: str, tokenizer, prompt_tokens: int, prefix: str = "",
                 logprobs: bool = False, id: str = None, dropped_messages: int = 0):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = id or new_id("chatcmpl" if chat else "cmpl")
        self.object = "chat.completion" if chat else "text_completion"
        self.prompt_tokens = prompt_tokens
        self.dropped_messages = dropped_messages  # said in the usage: the oldest turns left out
        self.prefix = prefix
        self.logprobs = logprobs  # the request asked for log probabilities
        self.pieces = [prefix]
        self.offset = len(prefix)  # characters of text so far (completions' text_offset)
        self.entries = []  # one logprobs entry per sampled token, when asked for
        self.tokens = 0
        self.finish_reason = None

    # -- logprobs entries ---------------------------------------------------------------------

    def _token(self, prev, token) -> tuple:
        data = self.tokenizer.piece(prev, token)
        return data.decode("utf-8", errors="replace"), data

    def _entry(self, lp):
        """This token's logprobs entry in the answer's shape (chat: content item; completions:
        (token, logprob, {top token: logprob}, text_offset))."""
        text, data = self._token(lp.prev, lp.token)
        if self.chat:
            top = []
            for t, v in lp.top:
                s, b = self._token(lp.prev, t)
                top.append({"token": s, "logprob": v, "bytes": list(b)})
            return {"token": text, "logprob": lp.logprob, "bytes": list(data), "top_logprobs": top}
        top = {}
        for t, v in lp.top:
            top.setdefault(self._token(lp.prev, t)[0], v)
        return text, lp.logprob, top, self.offset

    def _logprobs(self, entries):
        if self.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    # -- streaming ----------------------------------------------------------------------------

    def _chunk(self, text=None, finish_reason=None, logprobs=None, delta=None) -> dict:
        choice = {"index": 0}
        if self.chat:
            choice["delta"] = delta if delta is not None else ({"content": text} if text else {})
        else:
            choice["text"] = text or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice]}

    def start(self) -> list:
        """The chunks sent before any token: chat's role, a completion's echoed prompt."""
        if self.chat:
            return [self._chunk(delta={"role": "assistant", "content": ""})]
        return [self._chunk(self.prefix)] if self.prefix else []

    def push(self, event: Event) -> list:
        """Record one Event; returns its stream chunks (text and logprobs, then the finish)."""
        chunks = []
        entry = None
        if event.token is not None:
            self.tokens += 1
            if event.logprob is not None:
                entry = self._entry(event.logprob)
                self.entries.append(entry)
        if event.text or entry is not None:
            lp = None if entry is None else self._logprobs([entry])
            chunks.append(self._chunk(event.text, logprobs=lp))
            self.pieces.append(event.text)
            self.offset += len(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            chunks.append(self._chunk(finish_reason=event.finish_reason))
        return chunks

    def usage(self) -> dict:
        u = usage(self.prompt_tokens, self.tokens)
        if self.dropped_messages:
            u["dropped_messages"] = self.dropped_messages
        return u

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [], "usage": self.usage()}

    def stream(self, events, include_usage: bool = False):
        """The chunks of a whole stream of Events (the Python API's stream=True)."""
        yield from self.start()
        for event in events:
            yield from self.push(event)
        if include_usage:
            yield self.usage_chunk()

    # -- whole ------------------------------------------------------------------------------

    def result(self) -> dict:
        text = "".join(self.pieces)
        logprobs = self._logprobs(self.entries) if self.logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = self.finish_reason
        return {"id": self.id, "object": self.object, "created": int(time.time()), "model": self.model,
                "choices": [choice], "usage": self.usage()}

    def collect(self, events) -> dict:
        """The whole response from a stream of Events (the Python API's stream=False)."""
        for event in events:
            self.push(event)
        return self.result()
