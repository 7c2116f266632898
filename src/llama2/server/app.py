"""The HTTP layer: a Starlette app with OpenAI's endpoints (routes.py) in front of the batching
Scheduler, with the state they share made once here (routes.State). References: Starlette and
ASGI.
"""

import asyncio
import contextlib
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from . import page, security
from . import protocol as P
from . import routes
from .config import ServerConfig
from .metrics import Metrics
from .prepare import Preparer
from .routes import error_response
from .scheduler import Scheduler


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


def create_app(llama, config: ServerConfig = ServerConfig(), on_ready=None) -> Starlette:
    """The ASGI app serving `llama` (a loaded llama2.Llama). The scheduler thread runs while the
    app's lifespan does; `on_ready(app)` is called once it is running."""
    metrics = Metrics()
    scheduler = Scheduler(llama.model, llama.tokenizer, config.max_batch, config.max_queue, metrics,
                          invariant=config.invariant, kv_budget=config.kv_budget,
                          prefix_cache=config.prefix_cache, speculator=llama.speculator)
    prepare = Preparer(llama.tokenizer, llama.config.vocab_size, config.prepare_threads, config.max_parses,
                       config.max_compiles, config.retry_after_s)
    state = routes.State(config, scheduler, metrics, prepare, llama.tokenizer, llama.config,
                         config.chat_template or llama.chat_template, int(time.time()),
                         # named adapters, picked per request; a model loaded with Llama.load(lora=...)
                         # runs its adapter under its own name
                         tuple(lora.name for lora in llama.model.adapters) if llama.model.adapter < 0 else (),
                         llama.model.adapter)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        if on_ready is not None:
            on_ready(app)
        try:
            yield
        finally:
            prepare.close()
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    all_routes = [
        *routes.routes(),
        *page.routes(),  # the chat page at GET /: not secret, served without the API key
    ]

    async def not_routed(request, exc: HTTPException):  # unknown path, wrong method: same error shape
        path = P.shown(request.url.path, 80)[1:-1]
        return error_response(P.APIError(exc.status_code, f"{request.method} {path}: {exc.detail}",
                                          code="not_found" if exc.status_code == 404 else None,
                                          headers=exc.headers))  # 405: Allow

    app = Starlette(routes=all_routes, lifespan=lifespan, exception_handlers={HTTPException: not_routed},
                    middleware=[*security.middleware(config, error_response), Middleware(TrailingSlash)])
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.server = state
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config
    return app
