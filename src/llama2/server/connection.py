"""Connection hygiene below the ASGI app: uvicorn's h11 protocol with a deadline for headers and
limits on a request's head however its bytes arrive.

uvicorn closes a keep-alive connection idle for `timeout_keep_alive` seconds after a response, and
caps open connections (`limit_concurrency`), but it waits forever for a request's line and headers:
a connection that sends nothing, or half a header a byte at a time, holds a socket and a file
descriptor. `GuardedH11Protocol` closes such a connection `timeout_headers` seconds after it opened
(or after the first byte of its next request). Bodies have their own deadline in the app
(app.read_body, `timeout_body`), where a late one can be answered with a 408.

h11 bounds a request's head only while it is incomplete (16 KiB, `max_incomplete_event_size`):
5,000 headers or a 100 KB URL that arrive in one read were parsed whole and served.
`LimitedConnection` checks every parsed head against the same bounds (plus a count of headers and a
URL length, as cpp-httplib, llama.cpp's HTTP server, has them), and the refusal is answered with its
own status (414, 431) rather than uvicorn's plain 400.
"""

import logging

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

log = logging.getLogger("llama2.server")

MAX_HEAD_BYTES = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # request line and headers (h11's own bound)
MAX_HEADERS = 100  # header lines in one request
MAX_URL_BYTES = 8192  # the request target, query included


class LimitedConnection(h11.Connection):
    """An h11 server connection that refuses a head over the limits above, however it arrived,
    and keeps the refusal (`refused`: status, text) for the answer."""

    refused = None

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            self.refused = (e.error_status_hint, str(e))
            raise
        if isinstance(event, h11.Request):
            head = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if len(event.target) > MAX_URL_BYTES:
                self.refused = (414, f"request target is {len(event.target)} bytes, more than {MAX_URL_BYTES}")
            elif len(event.headers) > MAX_HEADERS:
                self.refused = (431, f"{len(event.headers)} header lines, more than {MAX_HEADERS}")
            elif head > MAX_HEAD_BYTES:
                self.refused = (431, f"request line and headers are {head} bytes, more than {MAX_HEAD_BYTES}")
            if self.refused:
                raise h11.RemoteProtocolError(self.refused[1], self.refused[0])
        return event


class GuardedH11Protocol(H11Protocol):
    timeout_headers = 10.0  # seconds; `protocol(...)` makes a subclass with the server's setting

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.conn = LimitedConnection(h11.SERVER, config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)

    def connection_made(self, transport):
        self._headers_timer = None
        super().connection_made(transport)
        self._arm()  # nothing sent yet counts as headers not sent

    def data_received(self, data: bytes):
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # a request has begun (or not): its headers must be complete in time
        else:
            self._disarm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str):
        """uvicorn's answer to a request h11 refused: with the refusal's own status and reason,
        nosniff as on every answer, then close."""
        status, text = self.conn.refused or (400, msg)
        body = text.encode("ascii", "replace")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
                   (b"connection", b"close"), (b"x-content-type-options", b"nosniff")]
        for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self):
        if self._headers_timer is None:
            self._headers_timer = self.loop.call_later(self.timeout_headers, self._headers_late)

    def _disarm(self):
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_late(self):
        self._headers_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closed a connection from %s: no complete request headers within %g s",
                     "%s:%d" % self.client if self.client else "?", self.timeout_headers)
            self.transport.close()


def protocol(timeout_headers: float) -> type:
    """The protocol class uvicorn should use (`uvicorn.Config(http=...)`)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"timeout_headers": timeout_headers})
