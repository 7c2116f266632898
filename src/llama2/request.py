"""A completion request's fields, validated once: the one record of their types and bounds.

The server validates a JSON body with these models (server/protocol.py), the Python API
(`Llama.create_completion` / `create_chat_completion`) its arguments; llama2.completions then
takes the typed values as given. Strict: no coercion ("1" is not a number, true is not 1);
unknown fields are ignored. A failure is a RequestError whose `param` is the field's path
(`messages[0].content`); the messages are ours, never an exception's text. pydantic is imported
here, so the Python API's completions need it (inference does not).
"""

from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from .chat import ROLES
from .errors import RequestError
from .structured import Grammar, GrammarError, Spec, read_schema

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_DEPTH = 64  # nesting of arrays and objects in a body
MAX_NAME_CHARS = 256  # model, user, message name
MAX_STOP_CHARS = 1024
MAX_MESSAGES = 4096
MAX_PROMPT_IDS = 1 << 20
MAX_TOKENS = 1 << 31  # max_tokens and friends; capped to the context left anyway
MAX_LOGPROBS = 5  # completions: `logprobs` at most (as OpenAI)
MAX_TOP_LOGPROBS = 20  # chat: `top_logprobs` at most (as OpenAI)
MAX_GRAMMAR_CHARS = 1 << 20  # a GBNF `grammar` (the body limit bounds it anyway)
ROLE_NAMES = (*ROLES, "developer")  # developer is OpenAI's new name for system


def shown(value, limit: int = 40) -> str:
    """A short printable form of a client's value for an error message (repr escapes surrogates)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def _schema(value):
    """A JSON schema (an object, true/false, or the same as JSON text) no deeper than
    structured.MAX_SCHEMA_DEPTH: the same check for either form, whoever sends it."""
    try:
        return read_schema(value)
    except GrammarError as e:
        raise _fail(str(e)) from None


Schema = Annotated[Any, AfterValidator(_schema)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Model):
    include_usage: Optional[bool] = None


class JSONSchemaFormat(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Optional[Text] = None
    schema_: Schema = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Model):
    """OpenAI's `response_format`: {"type": "text"}; {"type": "json_object"} (any JSON object;
    llama-cpp-python's "schema" beside it is honoured); {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None
    schema_: Optional[Schema] = Field(None, alias="schema")

    @model_validator(mode="after")
    def _fits_type(self):
        if self.json_schema is not None and self.type != "json_schema":
            raise _fail("only with type json_schema", ".json_schema")
        if self.type == "json_schema" and self.json_schema is None:
            raise _fail("required with type json_schema", ".json_schema")
        if self.schema_ is not None and self.type != "json_object":
            raise _fail("only with type json_object (json_schema.schema otherwise)", ".schema")
        return self

    def spec(self) -> Optional[Spec]:
        """What the output must match (None: plain text)."""
        if self.type == "json_schema":
            return Spec("json_schema", self.json_schema.schema_, strict=bool(self.json_schema.strict))
        if self.type == "json_object":
            return Spec("json_object") if self.schema_ is None else Spec("json_schema", self.schema_)
        return None


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
    """The fields both endpoints share. Options that would change the answer but are not
    implemented (n, best_of, penalties, logit_bias, tools) are refused, not ignored."""
    model: Optional[Any] = None  # the server checks it first (protocol.check_model)
    max_tokens: Optional[Count] = None
    temperature: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    seed: Optional[Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)]] = None
    stop: Any = ()  # validated: a tuple of non-empty strings
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]]] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    response_format: Optional[ResponseFormat] = None
    grammar: Any = None  # llama.cpp's GBNF text; the Python API also takes a Spec or a Grammar
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
        if not isinstance(v, (list, tuple)):
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

    @field_validator("grammar", mode="before")
    @classmethod
    def _grammar(cls, v):
        if v is None or isinstance(v, (Spec, Grammar)):
            return v
        if not isinstance(v, str):
            raise _fail(f"expected a GBNF grammar as a string, got {type(v).__name__}")
        if len(v) > MAX_GRAMMAR_CHARS:
            raise _fail(f"longer than {MAX_GRAMMAR_CHARS} characters")
        return Spec("grammar", _text(v))

    @model_validator(mode="after")
    def _supported(self):
        if (self.n or 1) != 1:
            raise _fail("only n=1 is supported; send one request per completion", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _fail("penalties are not supported", name)
        if self.logit_bias:
            raise _fail("logit_bias is not supported", "logit_bias")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise _fail("tool and function calls are not supported", name)
        if self.grammar is not None and self.response_format is not None and self.response_format.spec():
            raise _fail("give either grammar or response_format, not both", "grammar")
        return self

    def structure(self):
        """What the output must match: a structured.Spec or Grammar, or None for free text."""
        if self.grammar is not None:
            return self.grammar
        return self.response_format.spec() if self.response_format is not None else None

    def structure_param(self) -> str:
        """The field a structure that cannot be compiled is blamed on."""
        return "grammar" if self.grammar is not None else "response_format"


class CompletionBody(_Body):
    prompt: Any
    echo: Optional[bool] = None
    best_of: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]] = None
    suffix: Optional[Text] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """A string, or a non-empty list of token ids; a batch of one of either is unwrapped."""
        if v is None:
            raise PydanticCustomError("missing", "required")
        if isinstance(v, (list, tuple)) and len(v) == 1 and isinstance(v[0], (str, list, tuple)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            return _text(v)
        if isinstance(v, (list, tuple)) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if len(v) > MAX_PROMPT_IDS:
                raise _fail(f"at most {MAX_PROMPT_IDS} token ids")
            return tuple(v)
        if isinstance(v, (list, tuple)) and v and all(isinstance(p, (str, list)) for p in v):
            raise _fail("one prompt per request (a list of prompts is not supported)")
        raise _fail("expected a string or a non-empty list of token ids")

    @model_validator(mode="after")
    def _completion_only(self):
        if (self.best_of or 1) != 1:
            raise _fail("only best_of=1 is supported", "best_of")
        if self.suffix and not isinstance(self.prompt, str):  # an infill (llama2.infill) of text
            raise _fail("with a suffix, the prompt must be a string", "prompt")
        if self.top_logprobs:
            raise _fail(f"completions take logprobs: N (0 to {MAX_LOGPROBS}) for the N most likely tokens",
                        "top_logprobs")
        return self


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Optional[Count] = None
    logprobs: Optional[bool] = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v):
        if v is None:
            raise PydanticCustomError("missing", "required")
        if not isinstance(v, (list, tuple)) or not v:
            raise _fail("expected a non-empty list of messages")
        return list(v)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise _fail("needs logprobs: true", "top_logprobs")
        return self


# -- validation errors as RequestError ------------------------------------------------------------

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


def _error(e: ValidationError) -> RequestError:
    err = e.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    sub = ctx.get("sub") or ""
    param = _path(err["loc"])
    param = param + sub if param or not sub.startswith(".") else sub[1:]
    param = param or "body"
    message = _MESSAGES.get(err["type"]) or err["msg"].replace("Input should be", "expected")
    if err["type"] == "invalid":
        message = ctx["message"]
    elif err["type"] == "literal_error":
        message += f", got {shown(err.get('input'))}"
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    return RequestError(param, message, code)


def validate(model: type, fields: dict):
    """`fields` (a JSON body, or the Python API's arguments) as a `model` (CompletionBody or
    ChatBody); RequestError naming the first field at fault."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise _error(e) from None
    except RecursionError:  # depth is bounded before this (bodies, schemas); belt and braces
        raise RequestError("body", f"nested deeper than {MAX_DEPTH} levels", "invalid_json") from None
