"""Connection hygiene below the ASGI app: uvicorn's h11 protocol with a deadline for headers.

uvicorn closes a keep-alive connection idle for `timeout_keep_alive` seconds after a response, and
caps open connections (`limit_concurrency`), but it waits forever for a request's line and headers:
a connection that sends nothing, or half a header a byte at a time, holds a socket and a file
descriptor. `GuardedH11Protocol` closes such a connection `timeout_headers` seconds after it opened
(or after the first byte of its next request). Bodies have their own deadline in the app
(app.read_body, `timeout_body`), where a late one can be answered with a 408.
"""

import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llama2.server")


class GuardedH11Protocol(H11Protocol):
    timeout_headers = 10.0  # seconds; `protocol(...)` makes a subclass with the server's setting

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
