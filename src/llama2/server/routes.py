"""The HTTP handlers of OpenAI's endpoints, over one explicit `State` (app.state.server).

Bodies are read here (within `timeout_body` seconds), then parsed, validated and tokenized on a
worker thread and their structured output compiled on another (prepare.py), so neither a big
prompt nor a big schema holds up the event loop or the scheduler; the request is queued into the
scheduler and answered as JSON or as server-sent events, built by llama2.completions.Answer as the
Python API's are. The scheduler thread hands events to the request's asyncio queue; a task per
request watches for the client going away and cancels its job, which frees the slot before the
next step. Every request is counted in the metrics once, with its real outcome (a stream when it
ends: ok, 499 if the client left, or its error's status). References: OpenAI API reference;
Starlette and ASGI (http.disconnect).
"""

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import completions as C
from ..completions import Answer
from ..errors import Llama2Error
from . import protocol as P
from .config import ServerConfig
from .metrics import Metrics
from .prepare import Preparer, until_disconnect
from .scheduler import Cancelled, PromptTooLong, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("llama2.server")


@dataclass
class State:
    """Everything the handlers share: made once by create_app."""
    config: ServerConfig
    scheduler: Scheduler
    metrics: Metrics
    prepare: Preparer
    tokenizer: object
    model_config: object  # the model's llama2.ModelConfig
    chat_template: object  # a chat_template.ChatTemplate or built-in name: --chat-template, else the model's
    started: int  # Unix time: the models' `created`
    adapters: tuple = ()  # the LoRA adapters' model names, by their index in the model's adapters
    base_adapter: int = -1  # what the served model's own name runs: the model's default adapter

    def model_name(self, adapter: int) -> str:  # the `model` an answer names: the one the request named
        return self.config.model_name if adapter in (None, self.base_adapter) else self.adapters[adapter]


def _state(request) -> State:
    return request.app.state.server


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else _json(obj)) + b"\n\n"


def error_response(e: P.APIError) -> Response:
    # ASCII JSON: whatever a message quotes from the request, the body always encodes
    body = json.dumps(e.body(), ensure_ascii=True, separators=(",", ":")).encode()
    return Response(body, status_code=e.status, headers=e.headers, media_type="application/json")


class Generation:
    """One submitted job as seen from the event loop: an asyncio queue fed by the scheduler.
    `param`: the field blamed when the request's own input fails it mid-way (its grammar)."""

    def __init__(self, scheduler: Scheduler, params, constraint=None, param: str = None):
        loop = asyncio.get_running_loop()
        self.param = param
        self.queue = asyncio.Queue()
        self.job = scheduler.submit(params, lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item),
                                    constraint)

    async def events(self):
        """Yield Events until the last one (with its finish_reason); raise the job's error."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Cancelled):
                raise P.APIError(503, str(item), code="shutting_down")
            if isinstance(item, Llama2Error):  # logged by the scheduler, one line
                raise P.APIError(400, f"{self.param}: {item}", param=self.param, code="invalid_value")
            if isinstance(item, Exception):  # logged by the scheduler; its text stays there
                raise P.APIError(500, "generation failed (the server log has the details)",
                                 code="server_error")
            yield item
            if item.finish_reason is not None:
                return


class EventStream(Response):
    """Server-sent events from an async iterator of bytes; a client that goes away cancels `job`.
    `on_end(outcome)` is called once it is over: "ok", "499" (the client left) or an error status
    (`state["outcome"]`, set by the iterator when it ends in an error event)."""

    def __init__(self, chunks, job, state):
        self.status_code = 200
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.background = None
        self.chunks, self.job, self.state = chunks, job, state
        self.on_end = lambda outcome: None

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(until_disconnect(receive))]
        done, outcome, error = (), "499", None  # cancelled from outside: the server is going away
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.job.cancel()  # a no-op when it finished
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if tasks[0] in done and not tasks[0].cancelled():
                error = tasks[0].exception()
                outcome = "499" if isinstance(error, OSError) else "500" if error else self.state["outcome"]
            self.on_end(outcome)
        if error is not None and not isinstance(error, OSError):  # a bug while streaming
            raise error


def _authorize(request, key: bytes):
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
        raise P.APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                         code="invalid_api_key")


async def _read_body(request, config: ServerConfig) -> bytes:
    """The body, at most `max_body` bytes, received within `timeout_body` seconds."""
    length = request.headers.get("content-length")
    too_big = P.APIError(413, f"request body is larger than {config.max_body} bytes",
                         code="request_too_large")
    if length is not None and length.isdigit() and int(length) > config.max_body:
        raise too_big
    data = bytearray()
    try:
        async with asyncio.timeout(config.timeout_body):
            async for chunk in request.stream():
                data += chunk
                if len(data) > config.max_body:
                    raise too_big
    except TimeoutError:
        raise P.APIError(408, f"body: not received within {config.timeout_body:g} s (--timeout-body)",
                         param="body", code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise P.APIError(499, "the client disconnected while sending its body",
                         code="client_disconnected") from None
    return bytes(data)


def endpoint(name, handler, auth=True):
    """`handler` with the API key checked (unless not `auth`), its outcome counted, and any error
    answered in OpenAI's shape."""
    async def wrapped(request):
        state = _state(request)
        try:
            if auth:
                key = state.config.api_key
                _authorize(request, key.encode() if key else None)
            response = await handler(request)
            if isinstance(response, EventStream):  # counted when it ends, with how it ended
                response.on_end = functools.partial(state.metrics.request, name)
            else:
                state.metrics.request(name, "ok" if response.status_code < 400 else str(response.status_code))
            return response
        except P.APIError as e:
            if e.status == 499:
                log.info("%s: %s", name, e.message)
            state.metrics.request(name, str(e.status))
            return error_response(e)
        except Exception:  # a bug: log it, answer in OpenAI's shape, keep serving
            log.exception("%s: unexpected error", name)
            state.metrics.request(name, "500")
            return error_response(P.APIError(500, "internal error (the server log has the details)",
                                              code="server_error"))
    return wrapped


def _submit(state: State, params, constraint, param: str) -> Generation:
    try:
        return Generation(state.scheduler, params, constraint, param)
    except QueueFull as e:
        raise P.APIError(503, f"server busy: {e}; retry later", code="server_busy",
                         headers={"Retry-After": str(state.config.retry_after_s)}) from None
    except ShuttingDown as e:
        raise P.APIError(503, str(e), code="shutting_down") from None
    except PromptTooLong as e:
        raise P.APIError(400, str(e), code="context_length_exceeded") from None


async def _last(gen: Generation, ans: Answer, ev, on_end):
    """Before the last event reaches the client: the usage's cached tokens, then `on_end(ans)`."""
    if ev.finish_reason is not None:
        ans.cached_tokens = gen.job.reused  # set before the job's first event
        if on_end is not None:
            await on_end(ans)


async def _answer(request, gen: Generation, ans: Answer, on_end=None):
    """A non-streamed answer; if the client leaves first, cancel the job."""
    async def collect():
        async for ev in gen.events():
            ans.push(ev)
            await _last(gen, ans, ev, on_end)
        return ans.result()

    tasks = [asyncio.ensure_future(collect()), asyncio.ensure_future(until_disconnect(request.receive))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gen.job.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not tasks[0].done() or tasks[0].cancelled():
        return Response(status_code=499)  # nobody is listening
    return JSONResponse(tasks[0].result())  # raises the job's APIError


def _stream(gen: Generation, ans: Answer, include_usage: bool, on_end=None):
    state = {"outcome": "ok"}

    async def chunks():
        try:
            for obj in ans.start():
                yield _sse(obj)
            async for ev in gen.events():
                out = ans.push(ev)
                await _last(gen, ans, ev, on_end)
                for obj in out:
                    yield _sse(obj)
            if include_usage:
                yield _sse(ans.usage_chunk())
        except P.APIError as e:
            state["outcome"] = str(e.status)
            yield _sse(e.body())
        yield _sse(b"[DONE]")
    return EventStream(chunks(), gen.job, state)


async def _generate(request, state: State, req: P.Request, ans: Answer, on_end=None):
    """Compile the request's structured output (a 400 now if it cannot be), then queue it and
    answer: whole, or streamed. `on_end(ans)` runs once the answer is complete, before its end is
    sent."""
    params, constraint = await state.prepare.structure(req, request.receive)
    gen = _submit(state, params, constraint, req.body.structure_param())
    if not req.stream:
        return await _answer(request, gen, ans, on_end)
    return _stream(gen, ans, req.include_usage, on_end)


def _with_adapter(req: P.Request, adapter) -> P.Request:
    return dataclasses.replace(req, params=dataclasses.replace(req.params, adapter=adapter))


def _check_model(state: State, body) -> int:  # the request's LoRA adapter index (-1: none)
    adapter = P.check_model(body, state.config.model_name, state.adapters)
    return state.base_adapter if adapter is None else adapter


def _prepare_completion(state: State, data: bytes) -> P.Request:  # on a worker thread
    body = P.parse_body(data)
    adapter = _check_model(state, body)
    return _with_adapter(P.parse_completion(body, state.tokenizer, state.model_config), adapter)


def _prepare_chat(state: State, data: bytes) -> P.Request:  # on a worker thread
    body = P.parse_body(data)
    adapter = _check_model(state, body)
    return _with_adapter(P.parse_chat(body, state.tokenizer, state.model_config, state.chat_template,
                                      not state.config.refuse_long_chats), adapter)


async def completions(request):
    state = _state(request)
    req = await state.prepare.run(_prepare_completion, state, await _read_body(request, state.config))
    ans = Answer(False, state.model_name(req.params.adapter), state.tokenizer, len(req.params.prompt),
                 req.prompt_text if req.echo else "", logprobs=req.params.logprobs is not None)
    return await _generate(request, state, req, ans)


async def chat(request):
    state = _state(request)
    req = await state.prepare.run(_prepare_chat, state, await _read_body(request, state.config))
    ans = Answer(True, state.model_name(req.params.adapter), state.tokenizer, len(req.params.prompt),
                 logprobs=req.params.logprobs is not None, dropped_messages=req.params.dropped_messages)
    return await _generate(request, state, req, ans, functools.partial(_warm_next_turn, state, req))


async def _warm_next_turn(state: State, req: P.Request, ans: Answer):
    """A chat's reply is complete: before the client has it, queue the pass that computes the
    history its next turn starts with (the reply sent back verbatim, as the template renders it,
    which may differ from the tokens sampled), so that turn computes only its new message. Nothing
    is queued when the chat lost old turns (its next turn loses more) or the server is busy."""
    if not state.config.prefix_cache or req.params.dropped_messages:
        return
    try:
        ids = await state.prepare.run(C.history_ids, state.tokenizer, req.body, state.chat_template,
                                      ans.text())
    except (P.APIError, RuntimeError):  # the parsing threads are busy or shut down: only a head start
        return
    if ids is not None and len(ids) <= state.model_config.seq_len:
        state.scheduler.warm(ids, req.params.adapter)


def _model_object(state: State, adapter=None) -> dict:
    """OpenAI's model object; a LoRA adapter's also names its base (`parent`, as vLLM's)."""
    obj = {"id": state.model_name(adapter), "object": "model", "created": state.started, "owned_by": "llama2"}
    if adapter is not None:
        obj["parent"] = state.config.model_name
    return obj


async def models(request):
    state = _state(request)
    return JSONResponse({"object": "list",
                         "data": [_model_object(state)] + [_model_object(state, i) for i in range(len(state.adapters))]})


async def model(request):
    state = _state(request)
    return JSONResponse(_model_object(state, P.check_model({"model": request.path_params["model"]},
                                                           state.config.model_name, state.adapters)))


async def health(request):
    state = _state(request)
    config = state.config
    active, waiting = state.scheduler.load()
    return JSONResponse({"status": "ok", "model": config.model_name, "active": active,
                         "waiting": waiting, "max_batch": config.max_batch,
                         "max_queue": config.max_queue, "kv_cache": state.scheduler.kv_usage()})


async def prometheus(request):
    state = _state(request)
    return PlainTextResponse(state.metrics.render(*state.scheduler.load(), state.scheduler.kv_usage()),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


def routes() -> list:
    """The API's routes (the chat page's are page.routes())."""
    return [
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint("models", model), methods=["GET"]),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", chat), methods=["POST"]),
        Route("/health", endpoint("health", health, auth=False), methods=["GET"]),
        Route("/metrics", endpoint("metrics", prometheus), methods=["GET"]),
    ]
