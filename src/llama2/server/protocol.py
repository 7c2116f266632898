"""OpenAI API requests: bodies parsed and validated into generation Params (responses:
llama2.completions).

Reference: the OpenAI API reference for /v1/completions and /v1/chat/completions (legacy text
completions and chat completions; `n` > 1, penalties and tools are not supported and are refused).

Validation cannot throw: a body is parsed (`parse_body`), checked for depth, then validated once by
llama2.request's pydantic models, the same the Python API (`Llama.create_completion` /
`create_chat_completion`) validates its arguments with. Any JSON body becomes a Request or an
APIError whose `param` is the field's path (`messages[0].content`). Its Params are then made by
llama2.completions, as the Python API's are: the same defaults (the CLI's, from config.GENERATION),
the same stop and logprobs handling; a request without a seed gets a random one. A structured
output (`response_format` or `grammar`) is compiled afterwards, by server/prepare.py.
"""

import json
from dataclasses import dataclass

from .. import completions as C
from ..errors import RequestError
from ..generate import Params
from ..request import MAX_DEPTH, ChatBody, CompletionBody, shown, validate
from ..structured import depth  # JSON nesting, as schemas are measured

MAX_PIECE_BYTES = 32  # a token covers at most this many bytes of text (chat markers included)


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

    @classmethod
    def of(cls, e: RequestError) -> "APIError":
        """A field that cannot be served: a 400 naming it."""
        return cls(400, str(e), param=e.param, code=e.code)


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


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


def check_model(body, served: str, adapters=()) -> int | None:
    """The request's `model`: None for the served model itself, i for the LoRA adapter named
    adapters[i] (vLLM's --lora-modules); any other name is OpenAI's 404 model_not_found."""
    model = body.get("model")
    if model is None:
        raise APIError(400, "model: required (GET /v1/models lists it)", param="model",
                       code="missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"expected a string, got {type(model).__name__}")
    if model == served:
        return None
    if model in adapters:
        return list(adapters).index(model)
    names = ", ".join(repr(name) for name in (served, *adapters))
    raise APIError(404, f"The model {shown(model, 80)} does not exist; this server serves {names}",
                   param="model", code="model_not_found")



# -- requests -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """A validated request: what to generate and how to answer. `params.grammar` is None until
    server/prepare.py compiles `body.structure()`."""
    params: Params
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    body: CompletionBody | ChatBody  # every field as validated
    echo: bool = False  # completions: the prompt text comes first in the answer
    prompt_text: str = ""


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


def _stream(b) -> tuple:
    stream = bool(b.stream)
    return stream, bool(stream and b.stream_options and b.stream_options.include_usage)


def _validated(model: type, body: dict):
    try:
        return validate(model, body)
    except RequestError as e:
        raise APIError.of(e) from None


def parse_completion(body: dict, tokenizer, config) -> Request:
    """POST /v1/completions: `prompt` is a string or a list of token ids (used as given)."""
    b = _validated(CompletionBody, body)
    if isinstance(b.prompt, str):
        _check_text_fits("prompt", [b.prompt], config.seq_len)
    try:
        params, text = C.completion_params(tokenizer, config, b)
    except RequestError as e:
        raise APIError.of(e) from None
    return Request(params, *_stream(b), b, echo=bool(b.echo), prompt_text=text)


def parse_chat(body: dict, tokenizer, config, template, drop_turns: bool = True) -> Request:
    """POST /v1/chat/completions: messages rendered with the chat template; a system and a user
    message give exactly the tokens (and, seeded, the text) of `llama2 run -m chat -y SYS -i USER`."""
    b = _validated(ChatBody, body)
    # what must stay (older turns may be left out): the system prompt and the last message
    kept = b.messages if not drop_turns else [m for m in b.messages[:1] if m.role == "system"] + b.messages[-1:]
    _check_text_fits("messages", [m.content for m in kept], config.seq_len)
    try:
        params = C.chat_params(tokenizer, config, b, template, drop_turns=drop_turns)
    except RequestError as e:
        raise APIError.of(e) from None
    return Request(params, *_stream(b), b)
