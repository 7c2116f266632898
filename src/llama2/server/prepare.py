"""Requests made ready for the scheduler, off the event loop: parsed, validated and tokenized on
one pool of threads, their structured output (response_format or grammar) compiled and its
matcher built on another, so that a slow grammar delays only its own request.

Both queues are bounded: beyond `max_parses` parses or `max_compiles` compiles waiting or running,
a 503 with Retry-After (a compile takes seconds for a big schema, 10,000 properties: ~3 s;
llguidance drops the GIL while it works). A client that leaves while its compile waits takes it
off the queue (one already running finishes, for the cache: llguidance cannot be interrupted). Whatever
llguidance refuses is a 400 naming the field, found here, before any answer is started.
Compiled grammars are cached by their text (structured.GrammarCache).
"""

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

from .. import completions as C
from ..errors import RequestError
from ..generate import constraint_of
from . import protocol as P


async def until_disconnect(receive):
    """Returns when the client closes the connection (the request body is already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class BoundedPool:
    """Worker threads whose queue is bounded: a job beyond `limit` waiting or running is a 503
    with Retry-After (code server_busy) instead of a wait without end."""

    def __init__(self, threads: int, name: str, limit: int, what: str, retry_after_s: int):
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self.limit, self.what, self.retry_after_s = limit, what, retry_after_s
        self.pending = 0  # waiting or running
        self._lock = threading.Lock()

    def submit(self, fn, *args):
        """A concurrent Future of `fn(*args)`."""
        with self._lock:
            if self.pending >= self.limit:
                raise P.APIError(503, f"server busy: {self.pending} {self.what} (limit {self.limit}); "
                                 "retry later", code="server_busy",
                                 headers={"Retry-After": str(self.retry_after_s)})
            self.pending += 1
        job = self.executor.submit(fn, *args)
        job.add_done_callback(self._done)
        return job

    def _done(self, job):
        with self._lock:
            self.pending -= 1

    def close(self):
        self.executor.shutdown(wait=False, cancel_futures=True)


class Preparer:
    """The two pools; `run(fn, ...)` parses on the first, `structure(req, receive)` compiles on the
    second. `close()` at shutdown."""

    def __init__(self, tokenizer, vocab_size: int, threads: int, max_parses: int, max_compiles: int,
                 retry_after_s: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.parsers = BoundedPool(threads, "llama2-prepare", max_parses, "requests are being parsed",
                                   retry_after_s)
        self.compilers = BoundedPool(threads, "llama2-grammar", max_compiles, "grammars are being compiled",
                                     retry_after_s)

    async def run(self, fn, *args):
        """`fn(*args)` on a parsing thread: parsing, templating and tokenizing big inputs."""
        return await asyncio.wrap_future(self.parsers.submit(fn, *args))

    async def structure(self, req: P.Request, receive) -> tuple:
        """(params with their compiled grammar, its matcher): (req.params, None) without one."""
        if req.body.structure() is None:
            return req.params, None
        job = self.compilers.submit(self._compile, req)
        compiled = asyncio.wrap_future(job)
        left = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait([compiled, left], return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if not compiled.done():
            job.cancel()  # still waiting: never starts
            compiled.cancel()
            raise P.APIError(499, "the client disconnected while its grammar was compiled",
                             code="client_disconnected")
        return compiled.result()

    def _compile(self, req: P.Request) -> tuple:  # on a compiling thread
        try:
            grammar = C.compile_structure(req.body, self.tokenizer, self.vocab_size)
        except RequestError as e:
            raise P.APIError.of(e) from None
        params = dataclasses.replace(req.params, grammar=grammar)
        return params, constraint_of(params, self.tokenizer)

    def close(self):
        self.parsers.close()
        self.compilers.close()
