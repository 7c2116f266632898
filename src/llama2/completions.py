"""OpenAI-shaped completions, shared by the Python API (Llama.create_completion and
create_chat_completion) and the server: requests validated by llama2.request become
generate.Params, generation Events become response dicts and stream chunks. One code path, so a
seeded request gives the same answer from either.

Shapes: the OpenAI API reference for legacy completions (`text_completion`, logprobs as
tokens / token_logprobs / top_logprobs / text_offset) and chat completions (`chat.completion`,
`chat.completion.chunk`, logprobs as content[{token, logprob, bytes, top_logprobs}]).
"""

import secrets
import time
import uuid

from .chat import encode_dialog, reply_end_ids
from .chat_template import TemplateError
from .config import GENERATION
from .errors import RequestError
from .generate import Event, Params

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the context left


# -- validated requests -> Params -----------------------------------------------------------------
# The bodies come from llama2.request (CompletionBody, ChatBody), validated there once; what is
# checked here needs the model (token ids in the vocabulary, the context's length).

def compile_structure(body, tokenizer, vocab_size):
    """The request's structured.Grammar (compiled, or a Grammar passed in), or None for free text;
    RequestError naming `grammar` or `response_format` if it cannot be compiled."""
    from .structured import Grammar, GrammarError
    structure = body.structure()
    if structure is None or isinstance(structure, Grammar):
        return structure
    try:
        return Grammar.compile(structure, tokenizer, vocab_size)
    except GrammarError as e:
        raise RequestError(body.structure_param(), f"cannot be compiled: {e}") from None


def _params(prompt, field, seq_len, body, default_max, grammar, **extra) -> Params:
    n = len(prompt)
    left = seq_len - n + 1  # run.c: positions 0..steps-1 with steps <= seq_len
    if left < 1:
        raise RequestError(field, f"{n} prompt tokens exceed the model's context of {seq_len}",
                           code="context_length_exceeded")
    asked = body.max_tokens or getattr(body, "max_completion_tokens", None)  # the latter: chat only
    max_tokens = min(asked or default_max or left, left)
    temperature = GENERATION.temperature if body.temperature is None else body.temperature
    top_p = GENERATION.top_p if body.top_p is None else body.top_p
    seed = body.seed
    if seed is None or seed <= 0:  # run.c would seed from the clock: concurrent requests must not share
        seed = secrets.randbits(63) or 1
    return Params(prompt=tuple(prompt), max_tokens=max_tokens, temperature=float(temperature),
                  top_p=float(top_p), seed=seed, stop=body.stop, grammar=grammar, **extra)


def completion_params(tokenizer, config, body, grammar=None) -> tuple:
    """(Params, prompt text) of a validated request.CompletionBody; `grammar`: its compiled
    structure (compile_structure). A string prompt is encoded with BOS, token ids are used as
    given; generation stops at BOS or EOS, as run.c's. A `suffix` (OpenAI's insertion) makes it an
    infill: the text between the prompt and the suffix in Code Llama's layout (llama2.infill),
    ending at its end-of-middle token."""
    prompt, fim = body.prompt, None
    if body.suffix:
        from . import infill
        fim = infill.fim_tokens(tokenizer)
        if fim is None:
            raise RequestError("suffix", infill.missing_message("the model"))
        ids, text = infill.prompt(tokenizer, fim, prompt, body.suffix), prompt
    elif isinstance(prompt, str):
        ids, text = tokenizer.encode(prompt, bos=True), prompt
    else:
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise RequestError("prompt", f"token ids must be in [0, {config.vocab_size})")
        ids, text = list(prompt), tokenizer.decode(prompt)
    ends = {config.bos_id, config.eos_id} | tokenizer.end_ids | ({fim.end} if fim else set())
    params = _params(ids, "prompt", config.seq_len, body, COMPLETION_MAX_TOKENS, grammar,
                     stop_tokens=frozenset(ends), logprobs=body.logprobs)
    return params, text


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


def chat_params(tokenizer, config, body, template="llama2", grammar=None, drop_turns=True) -> Params:
    """Params of a validated request.ChatBody: the messages rendered with the chat template; a
    system and a user message give exactly the tokens (and, seeded, the text) of
    `llama2 run -m chat -y SYS -i USER`. A history that does not fit the context loses its oldest
    turns (`drop_turns`; the count is Params.dropped_messages) or, with drop_turns=False, is refused."""
    pairs = [(m.role, m.content) for m in body.messages]
    try:
        if drop_turns:
            max_tokens = body.max_tokens or body.max_completion_tokens
            reserve = max_tokens if max_tokens else config.seq_len // 4
            ids, dropped = fit_dialog(tokenizer, pairs, template, config.seq_len, min(reserve, config.seq_len // 2))
        else:
            ids, dropped = encode_dialog(tokenizer, pairs, template), 0
    except ValueError as e:
        raise RequestError(str(e).split(":", 1)[0], str(e).split(": ", 1)[-1]) from None
    except TemplateError as e:  # the model's template refuses these messages
        raise RequestError("messages", str(e)) from None
    # run.c's chat mode: EOS (or the template's end marker) ends the reply; it draws a coin at every
    # prompt position but the last.
    stop_tokens = reply_end_ids(tokenizer, template, config.eos_id)
    return _params(ids, "messages", config.seq_len, body, None, grammar, stop_tokens=stop_tokens,
                   skip_coins=len(ids) - 1, dropped_messages=dropped,
                   logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def history_ids(tokenizer, body, template, reply: str) -> list:
    """The ids a chat's next turn starts with when it sends back `reply` verbatim: the messages of
    a validated request.ChatBody and `reply` as the assistant's, rendered with no generation prompt;
    None when the template refuses that."""
    pairs = [(m.role, m.content) for m in body.messages] + [("assistant", reply)]
    try:
        return encode_dialog(tokenizer, pairs, template, add_generation_prompt=False)
    except (ValueError, TemplateError):
        return None


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
        self.cached_tokens = 0  # prompt tokens whose keys and values were reused (the server's prefix cache)

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
        u["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}  # OpenAI's field for prompt caching
        if self.dropped_messages:
            u["dropped_messages"] = self.dropped_messages
        return u

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [], "usage": self.usage()}

    def text(self) -> str:
        """The answer's text so far (a completion's echoed prompt included)."""
        return "".join(self.pieces)

    def stream(self, events, include_usage: bool = False):
        """The chunks of a whole stream of Events (the Python API's stream=True)."""
        yield from self.start()
        for event in events:
            yield from self.push(event)
        if include_usage:
            yield self.usage_chunk()

    # -- whole ------------------------------------------------------------------------------

    def result(self) -> dict:
        text = self.text()
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
