"""Browser-facing defences: a Host allow-list, JSON-only bodies, CORS only when asked, nosniff.

A server on loopback is still reachable from every web page its user opens. A page may send a
"simple" cross-origin POST (text/plain, no preflight) and so drive generation, and a DNS-rebinding
page (its own name re-pointed at 127.0.0.1) may also read the answers. As Jupyter and llama.cpp's
server do, the server answers only Host names it was told are its own (`allowed_hosts`: loopback
names by default; 421 otherwise), takes a body only as `application/json` (415 otherwise), which
no page can send cross-origin without a CORS preflight, answers preflights only for
`cors_origins`, and marks every answer `X-Content-Type-Options: nosniff`. The limits on a
request's head (count and size of headers, URL length) need the raw bytes: connection.py.
References: RFC 9110 (Host, 415, 421); the Fetch standard (CORS-safelisted requests).
"""

from . import protocol as P
from .config import ServerConfig

NOSNIFF = (b"x-content-type-options", b"nosniff")
JSON_TYPE = "application/json"
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def host_name(value: str):
    """The name in a Host header ("localhost:8000" -> "localhost", "[::1]:80" -> "::1"),
    lower-cased, or None when it is not a well-formed host[:port]."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    return name or None


def allowed_names(hosts) -> frozenset:
    """`--allowed-hosts` entries as the names `host_name` gives: "[::1]" and "::1" -> "::1",
    "a.example:8000" -> "a.example" (any port is answered)."""
    def name(entry):
        entry = entry.strip().lower()
        bare_ipv6 = entry.count(":") > 1 and not entry.startswith("[")
        return entry if bare_ipv6 else host_name(entry) or entry
    return frozenset(map(name, hosts))


class HostCheck:
    """ASGI: a request whose Host is not one of `names` gets a 421 (DNS rebinding: the browser
    sends the attacker's name)."""

    def __init__(self, app, names, error):
        self.app, self.names, self.error = app, frozenset(names), error
        self.listed = ", ".join(f"[{n}]" if ":" in n else n for n in sorted(self.names))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if host_name(host or "") not in self.names:
                what = "missing" if host is None else P.shown(host, 80)
                response = self.error(P.APIError(
                    421, f"Host {what}: this server answers only to {self.listed} (add names with "
                    "--allowed-hosts)", param="Host", code="host_not_allowed"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class JsonBodies:
    """ASGI: a request that carries a body must declare it `application/json`, else 415 before it
    is read (every body this server takes is JSON; a page can send other types cross-origin)."""

    def __init__(self, app, error):
        self.app, self.error = app, error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            headers = dict(scope["headers"])  # a repeated header: the last one
            has_body = headers.get(b"content-length", b"0").strip() != b"0" or b"transfer-encoding" in headers
            kind = headers.get(b"content-type", b"").decode("latin-1")
            if has_body and kind.partition(";")[0].strip().lower() != JSON_TYPE:
                what = P.shown(kind, 80) if kind else "missing"
                response = self.error(P.APIError(415, f"Content-Type {what}: expected {JSON_TYPE}",
                                                 param="Content-Type", code="unsupported_media_type"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class NoSniff:
    """ASGI: `X-Content-Type-Options: nosniff` on every answer (a browser must not take a JSON
    error quoting the client's text for HTML or script)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_nosniff(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == NOSNIFF[0] for k, _ in headers):
                    message = dict(message, headers=headers + [NOSNIFF])
            await send(message)
        await self.app(scope, receive, send_nosniff)


def middleware(config: ServerConfig, error) -> list:
    """Starlette middleware, outermost first, for `config`'s allowed_hosts (None: any Host) and
    cors_origins (empty: no CORS); `error(APIError)` makes the error response."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    layers = [Middleware(NoSniff)]
    if config.allowed_hosts is not None:
        layers.append(Middleware(HostCheck, names=allowed_names(config.allowed_hosts), error=error))
    if config.cors_origins:
        layers.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                 allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                 max_age=600))
    layers.append(Middleware(JsonBodies, error=error))
    return layers
