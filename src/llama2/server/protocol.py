"""OpenAI API requests: bodies validated into generation Params (responses: llama2.completions).

Reference: the OpenAI API reference for /v1/completions and /v1/chat/completions (legacy text
completions and chat completions; `n` > 1, penalties and tools are not supported and are refused).

Validation cannot throw: a body is parsed (`parse_body`), checked for depth, then validated by
pydantic models with explicit bounds (finite numbers, integer ranges, string lengths, valid
Unicode). Any JSON body becomes a Request or an APIError whose `param` is the field's path
(`messages[0].content`); error messages are ours, never an exception's text. The validated body
(`Request.body`) keeps every field as sent, so new options need a field here and a use elsewhere.
Once a body is valid, its Params are made by llama2.completions, as the Python API's
(`Llama.create_completion` / `create_chat_completion`) are: the same defaults (the CLI's, from
config.GENERATION), the same stop, logprobs and structured-output handling; a request without a
seed gets a random one. A `response_format` schema is compiled here, on the worker thread.
"""

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from .. import completions as C
from ..chat import ROLES
from ..generate import Params

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_DEPTH = 64  # nesting of arrays and objects anywhere in a body
MAX_NAME_CHARS = 256  # model, user, message name, schema name
MAX_STOP_CHARS = 1024
MAX_MESSAGES = 4096
MAX_PROMPT_IDS = 1 << 20
MAX_TOKENS = 1 << 31  # max_tokens and friends; capped to the context left anyway
MAX_PIECE_BYTES = 32  # a token covers at most this many bytes of text (chat markers included)
ROLE_NAMES = (*ROLES, "developer")  # developer is OpenAI's new name for system


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


def shown(value, limit: int = 40) -> str:
    """A short printable form of a client's value for an error message (repr escapes surrogates)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- the body as JSON -----------------------------------------------------------------------------

def parse_body(data: bytes) -> dict:
    """Bytes -> a JSON object no deeper than MAX_DEPTH, or a 400 naming `body`."""
    try:
        body = json.loads(data)
    except json.JSONDecodeError as e:
        raise APIError(400, f"body: not valid JSON (line {e.lineno}, column {e.colno})", param="body",
                       code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"body: not valid UTF-8 (byte {e.start})", param="body",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"body: nested deeper than {MAX_DEPTH} levels", param="body",
                       code="invalid_json") from None
    except ValueError:  # e.g. an integer literal beyond Python's digit limit
        raise APIError(400, "body: not valid JSON (a number is too long)", param="body",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", param="body", code="invalid_json")
    if depth(body) > MAX_DEPTH:
        raise APIError(400, f"body: nested deeper than {MAX_DEPTH} levels", param="body",
                       code="invalid_json")
    return body


def depth(value) -> int:
    """Nesting depth of arrays and objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


# -- field types ----------------------------------------------------------------------------------

def _unicode(s: str) -> str:
    """Strings must encode to UTF-8: JSON allows lone surrogates (\\ud800), text cannot hold them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError("lone_surrogate", f"contains a lone surrogate (U+{ord(s[e.start]):04X} "
                                  f"at index {e.start}); text must be valid Unicode") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_unicode)]
Count = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


def _fail(message: str, sub: str = "") -> PydanticCustomError:
    """A custom validation error; `sub` extends the field's path (`[3]` -> `stop[3]`)."""
    return PydanticCustomError("invalid", "{message}", {"message": message, "sub": sub})


def _text(value, sub: str = "") -> str:
    if not isinstance(value, str):
        raise _fail(f"expected a string, got {type(value).__name__}", sub)
    try:
        return _unicode(value)
    except PydanticCustomError as e:
        raise _fail(e.message(), sub) from None


class _Model(BaseModel):
    # strict: no coercion ("1" is not a number, true is not 1); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Model):
    include_usage: Optional[bool] = None


class JSONSchemaFormat(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Optional[Text] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @field_validator("json_schema")
    @classmethod
    def _needs_type(cls, v, info):
        if v is not None and info.data.get("type") != "json_schema":
            raise _fail("only with type json_schema")
        return v

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise _fail("required with type json_schema", ".json_schema")
        return self


class Message(_Model):
    role: Any
    content: Any
    name: Optional[Name] = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v):
        if v is None:
            raise PydanticCustomError("missing", "required")
        if not isinstance(v, str) or v not in ROLE_NAMES:
            raise _fail(f"expected one of {', '.join(ROLE_NAMES)}, got {shown(v)}")
        return "system" if v == "developer" else v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):  # content parts: only text ones
            parts = []
            for j, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or "text" not in part:
                    raise _fail("only text content parts are supported", f"[{j}]")
                parts.append(_text(part["text"], f"[{j}].text"))
            return "".join(parts)
        if v is None:
            raise PydanticCustomError("missing", "required")
        if not isinstance(v, str):
            raise _fail(f"expected a string or a list of text parts, got {type(v).__name__}")
        return _text(v)


class _Body(_Model):
    """The fields both endpoints share."""
    model: Optional[Any] = None  # checked first by check_model
    max_tokens: Optional[Count] = None
    temperature: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    seed: Optional[Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)]] = None
    stop: Any = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]]] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    response_format: Optional[ResponseFormat] = None
    tools: Any = None
    functions: Any = None
    user: Optional[Name] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise _fail(f"expected a string or a list of strings, got {type(v).__name__}")
        if len(v) > MAX_STOP_STRINGS:
            raise _fail(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        out = []
        for i, s in enumerate(v):  # the param stays `stop`; the message names the item
            if not isinstance(s, str):
                raise _fail(f"expected a string or a list of strings; item {i} is {type(s).__name__}")
            try:
                _unicode(s)
            except PydanticCustomError as e:
                raise _fail(f"item {i} {e.message()}") from None
            if len(s) > MAX_STOP_CHARS:
                raise _fail(f"item {i} is longer than {MAX_STOP_CHARS} characters")
            out.append(s)
        return tuple(s for s in out if s)


class CompletionBody(_Body):
    prompt: Any
    echo: Optional[bool] = None
    best_of: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None
    suffix: Optional[Text] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """A string, or a non-empty list of token ids; a batch of one of either is unwrapped."""
        if v is None:
            raise PydanticCustomError("missing", "required")
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            return _text(v)
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if len(v) > MAX_PROMPT_IDS:
                raise _fail(f"at most {MAX_PROMPT_IDS} token ids")
            return tuple(v)
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            raise _fail("one prompt per request (a list of prompts is not supported)")
        raise _fail("expected a string or a non-empty list of token ids")


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Optional[Count] = None
    logprobs: Optional[bool] = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if v is None:
            raise PydanticCustomError("missing", "required")
        if not isinstance(v, list) or not v:
            raise _fail("expected a non-empty list of messages")
        return v


# -- validation errors as APIError ----------------------------------------------------------------

_MESSAGES = {  # pydantic error type -> our wording (the rest: pydantic's message, reworded)
    "missing": "required", "model_type": "expected an object", "dict_type": "expected an object",
    "model_attributes_type": "expected an object", "string_type": "expected a string",
    "int_type": "expected an integer", "float_type": "expected a number",
    "bool_type": "expected true or false", "list_type": "expected a list",
    "finite_number": "expected a finite number", "literal_error": None,
}


def _path(loc) -> str:
    path = ""
    for part in loc:
        if isinstance(part, str) and not (part.isidentifier() and part.isascii() and len(part) <= 64):
            part = shown(part, 40)  # a client's key (logit_bias): quoted, escaped, short
            path += f"[{part}]"
        elif isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path.replace(".schema_", ".schema")


def _api_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False, include_input=False)[0]
    ctx = err.get("ctx") or {}
    param = _path(err["loc"]) + (ctx.get("sub") or "")
    message = _MESSAGES.get(err["type"]) or err["msg"].replace("Input should be", "expected")
    if err["type"] == "invalid":
        message = ctx["message"]
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _validate(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e) from None
    except RecursionError:  # depth is bounded before this; belt and braces
        raise APIError(400, f"body: nested deeper than {MAX_DEPTH} levels", param="body",
                       code="invalid_json") from None


def check_model(body, served: str):
    model = body.get("model")
    if model is None:
        raise APIError(400, "model: required (GET /v1/models lists it)", param="model",
                       code="missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"expected a string, got {type(model).__name__}")
    if model != served:
        raise APIError(404, f"The model {shown(model, 80)} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _refuse(b: _Body):
    """Options that would change the answer but are not implemented: a 400 rather than ignored."""
    if (b.n or 1) != 1:
        raise bad("n", "only n=1 is supported; send one request per completion")
    if (getattr(b, "best_of", None) or 1) != 1:
        raise bad("best_of", "only best_of=1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(b, name):
            raise bad(name, "penalties are not supported")
    if b.logit_bias:
        raise bad("logit_bias", "logit_bias is not supported")
    for name in ("tools", "functions"):
        if getattr(b, name):
            raise bad(name, "tool and function calls are not supported")
    if getattr(b, "suffix", None):
        raise bad("suffix", "suffix (insertion) is not supported")


# -- requests -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """A validated request: what to generate and how to answer."""
    params: Params
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False  # completions: the prompt text comes first in the answer
    prompt_text: str = ""
    body: _Body = None  # every field as validated (CompletionBody or ChatBody)


def _too_long(field: str, n: int, seq_len: int, at_least: bool = False) -> APIError:
    return APIError(400, f"{field}: {'at least ' if at_least else ''}{n} prompt tokens exceed the model's "
                    f"context of {seq_len}", param=field, code="context_length_exceeded")


def _check_text_fits(field: str, texts, seq_len: int):
    """Refuse text that cannot fit before spending time on tokenizing it: every token covers at
    most MAX_PIECE_BYTES bytes, so a text of B bytes is at least B / MAX_PIECE_BYTES tokens."""
    nbytes = sum(len(t.split("\0", 1)[0].encode("utf-8")) for t in texts)
    least = -(-nbytes // MAX_PIECE_BYTES)
    if least > seq_len:
        raise _too_long(field, least, seq_len, at_least=True)


def _from_request_error(e: C.RequestError) -> APIError:
    return APIError(400, str(e), param=e.param, code=e.code)


def _stream(b: _Body) -> tuple:
    stream = bool(b.stream)
    return stream, bool(stream and b.stream_options and b.stream_options.include_usage)


def parse_completion(body: dict, tokenizer, config) -> Request:
    """POST /v1/completions: `prompt` is a string or a list of token ids (used as given)."""
    b = _validate(CompletionBody, body)
    _refuse(b)
    if b.top_logprobs:
        raise bad("top_logprobs", "completions take logprobs: N (0 to 5) for the N most likely tokens")
    prompt = b.prompt
    if isinstance(prompt, str):
        _check_text_fits("prompt", [prompt], config.seq_len)
    stream, usage = _stream(b)
    try:
        params, text = C.completion_params(
            tokenizer, config, prompt, b.max_tokens, b.temperature, b.top_p, b.seed, b.stop, b.logprobs,
            body.get("response_format"))
    except C.RequestError as e:
        raise _from_request_error(e) from None
    return Request(params, stream, usage, echo=bool(b.echo), prompt_text=text, body=b)


def parse_chat(body: dict, tokenizer, config, template, drop_turns: bool = True) -> Request:
    """POST /v1/chat/completions: messages rendered with the chat template; a system and a user
    message give exactly the tokens (and, seeded, the text) of `llama2 run -m chat -y SYS -i USER`."""
    b = _validate(ChatBody, body)
    _refuse(b)
    messages = [{"role": m.role, "content": m.content} for m in b.messages]
    # what must stay (older turns may be left out): the system prompt and the last message
    kept = messages if not drop_turns else [m for m in messages[:1] if m["role"] == "system"] + messages[-1:]
    _check_text_fits("messages", [m["content"] for m in kept], config.seq_len)
    stream, usage = _stream(b)
    try:
        params = C.chat_params(tokenizer, config, messages, template, b.max_tokens or b.max_completion_tokens,
                               b.temperature, b.top_p, b.seed, b.stop, bool(b.logprobs), b.top_logprobs,
                               body.get("response_format"), drop_turns=drop_turns)
    except C.RequestError as e:
        raise _from_request_error(e) from None
    return Request(params, stream, usage, body=b)
