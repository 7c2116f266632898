"""The HTTP layer: a Starlette app with OpenAI's endpoints in front of the batching Scheduler.

Bodies are read here (within `timeout_body` seconds), then parsed, validated and tokenized
(protocol.py; a response_format's grammar compiled) on a worker thread, so a big prompt never
holds up the event loop; the request is queued into the scheduler and answered as JSON or as
server-sent events, built by llama2.completions.Answer as the Python API's are. The scheduler
thread hands events to the request's asyncio queue; a task per request watches for the client going away and
cancels its job, which frees the slot before the next step. Every request is counted in the
metrics once, with its real outcome (a stream when it ends: ok, 499 if the client left, or its
error's status). References: OpenAI API reference; Starlette and ASGI (http.disconnect).
"""

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..completions import Answer
from . import page
from . import protocol as P
from .config import ServerConfig
from .metrics import Metrics
from .scheduler import Cancelled, PromptTooLong, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("llama2.server")


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else _json(obj)) + b"\n\n"


def error_response(e: P.APIError) -> Response:
    # ASCII JSON: whatever a message quotes from the request, the body always encodes
    body = json.dumps(e.body(), ensure_ascii=True, separators=(",", ":")).encode()
    return Response(body, status_code=e.status, headers=e.headers, media_type="application/json")


class TrailingSlash:
    """ASGI: `/v1/models/` is answered as `/v1/models` (no redirect: it would be built from the
    client's Host header)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
        await self.app(scope, receive, send)


async def _until_disconnect(receive):
    """Returns when the client closes the connection (the request body is already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Generation:
    """One submitted job as seen from the event loop: an asyncio queue fed by the scheduler."""

    def __init__(self, scheduler: Scheduler, params):
        loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()
        self.job = scheduler.submit(params, lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item))

    async def events(self):
        """Yield Events until the last one (with its finish_reason); raise the job's error."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Cancelled):
                raise P.APIError(503, str(item), code="shutting_down")
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

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(_until_disconnect(receive))]
        done, outcome = (), "499"  # cancelled from outside: the server is going away
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
        if outcome == "500":
            raise tasks[0].exception()


def create_app(llama, config: ServerConfig = ServerConfig(), on_ready=None) -> Starlette:
    """The ASGI app serving `llama` (a loaded llama2.Llama). The scheduler thread runs while the
    app's lifespan does; `on_ready(app)` is called once it is running."""
    metrics = Metrics()
    scheduler = Scheduler(llama.model, llama.tokenizer, config.max_batch, config.max_queue, metrics,
                          invariant=config.invariant, kv_budget=config.kv_budget,
                          prefix_cache=config.prefix_cache)
    tokenizer, model_config = llama.tokenizer, llama.config
    template = config.chat_template or llama.chat_template
    started = int(time.time())
    key = config.api_key.encode() if config.api_key else None
    workers = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="llama2-prepare")

    def authorize(request):
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise P.APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                             code="invalid_api_key")

    async def read_body(request) -> bytes:
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

    async def off_loop(fn, *args):
        """Run `fn(*args)` on a worker thread: parsing, templating and tokenizing big inputs."""
        return await asyncio.get_running_loop().run_in_executor(workers, functools.partial(fn, *args))

    def endpoint(name, handler, auth=True):
        async def wrapped(request):
            try:
                if auth:
                    authorize(request)
                response = await handler(request)
                if isinstance(response, EventStream):  # counted when it ends, with how it ended
                    response.on_end = functools.partial(metrics.request, name)
                else:
                    metrics.request(name, "ok" if response.status_code < 400 else str(response.status_code))
                return response
            except P.APIError as e:
                if e.status == 499:
                    log.info("%s: %s", name, e.message)
                metrics.request(name, str(e.status))
                return error_response(e)
            except Exception:  # a bug: log it, answer in OpenAI's shape, keep serving
                log.exception("%s: unexpected error", name)
                metrics.request(name, "500")
                return error_response(P.APIError(500, "internal error (the server log has the details)",
                                                  code="server_error"))
        return wrapped

    def submit(params) -> Generation:
        try:
            return Generation(scheduler, params)
        except QueueFull as e:
            raise P.APIError(503, f"server busy: {e}; retry later", code="server_busy",
                             headers={"Retry-After": str(config.retry_after_s)}) from None
        except ShuttingDown as e:
            raise P.APIError(503, str(e), code="shutting_down") from None
        except PromptTooLong as e:
            raise P.APIError(400, str(e), code="context_length_exceeded") from None

    async def answer(request, gen: Generation, ans: Answer):
        """A non-streamed answer; if the client leaves first, cancel the job."""
        async def collect():
            async for ev in gen.events():
                ans.push(ev)
            return ans.result()

        tasks = [asyncio.ensure_future(collect()), asyncio.ensure_future(_until_disconnect(request.receive))]
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

    def stream(gen: Generation, ans: Answer, include_usage: bool):
        state = {"outcome": "ok"}

        async def chunks():
            try:
                for obj in ans.start():
                    yield _sse(obj)
                async for ev in gen.events():
                    for obj in ans.push(ev):
                        yield _sse(obj)
                if include_usage:
                    yield _sse(ans.usage_chunk())
            except P.APIError as e:
                state["outcome"] = str(e.status)
                yield _sse(e.body())
            yield _sse(b"[DONE]")
        return EventStream(chunks(), gen.job, state)

    def prepare_completion(data: bytes) -> P.Request:  # on a worker thread
        body = P.parse_body(data)
        P.check_model(body, config.model_name)
        return P.parse_completion(body, tokenizer, model_config)

    def prepare_chat(data: bytes) -> P.Request:  # on a worker thread
        body = P.parse_body(data)
        P.check_model(body, config.model_name)
        return P.parse_chat(body, tokenizer, model_config, template, not config.refuse_long_chats)

    async def completions(request):
        req = await off_loop(prepare_completion, await read_body(request))
        gen = submit(req.params)
        ans = Answer(False, config.model_name, tokenizer, len(req.params.prompt),
                     req.prompt_text if req.echo else "", logprobs=req.params.logprobs is not None)
        if not req.stream:
            return await answer(request, gen, ans)
        return stream(gen, ans, req.include_usage)

    async def chat(request):
        req = await off_loop(prepare_chat, await read_body(request))
        gen = submit(req.params)
        ans = Answer(True, config.model_name, tokenizer, len(req.params.prompt),
                     logprobs=req.params.logprobs is not None, dropped_messages=req.params.dropped_messages)
        if not req.stream:
            return await answer(request, gen, ans)
        return stream(gen, ans, req.include_usage)

    def model_object():
        return {"id": config.model_name, "object": "model", "created": started, "owned_by": "llama2"}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def model(request):
        if request.path_params["model"] != config.model_name:
            raise P.APIError(404, f"The model {P.shown(request.path_params['model'], 80)} does not exist",
                             param="model", code="model_not_found")
        return JSONResponse(model_object())

    async def health(request):
        active, waiting = scheduler.load()
        return JSONResponse({"status": "ok", "model": config.model_name, "active": active,
                             "waiting": waiting, "max_batch": config.max_batch,
                             "max_queue": config.max_queue, "kv_cache": scheduler.kv_usage()})

    async def prometheus(request):
        return PlainTextResponse(metrics.render(*scheduler.load(), scheduler.kv_usage()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        if on_ready is not None:
            on_ready(app)
        try:
            yield
        finally:
            workers.shutdown(wait=False, cancel_futures=True)
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    routes = [
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint("models", model), methods=["GET"]),
        Route("/v1/completions", endpoint("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", chat), methods=["POST"]),
        Route("/health", endpoint("health", health, auth=False), methods=["GET"]),
        Route("/metrics", endpoint("metrics", prometheus), methods=["GET"]),
        *page.routes(),  # the chat page at GET /: not secret, served without the API key
    ]
    async def not_routed(request, exc: HTTPException):  # unknown path, wrong method: same error shape
        path = P.shown(request.url.path, 80)[1:-1]
        return error_response(P.APIError(exc.status_code, f"{request.method} {path}: {exc.detail}",
                                          code="not_found" if exc.status_code == 404 else None,
                                          headers=exc.headers))  # 405: Allow

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_routed},
                    middleware=[Middleware(TrailingSlash)])
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config
    return app
