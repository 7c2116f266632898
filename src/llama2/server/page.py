"""The chat page: `GET /` serves a small browser client shipped in the package (static/).

Plain HTML, CSS and JavaScript with no third-party code and nothing fetched from elsewhere, so it
works offline. It talks to this server's own `/v1/chat/completions` (streamed), so it needs what
every client needs: the API key when the server has one. The page itself is not secret and is
served without the key. A strict Content-Security-Policy (scripts and styles from this origin only,
no inline script) backs up the page's own rule of never putting model output into innerHTML.
"""

from importlib import resources

from starlette.responses import Response
from starlette.routing import Route

# path -> (file in static/, content type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/static/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
# (X-Content-Type-Options: nosniff is on every answer of the server: security.py)
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def read(name: str) -> bytes:
    """One of the page's files, from the installed package."""
    return (resources.files(__package__) / "static" / name).read_bytes()


def routes() -> list:
    """GET routes for the page's files (read once, here)."""
    def serve(body: bytes, media_type: str):
        async def endpoint(request):
            return Response(body, media_type=media_type, headers=HEADERS)
        return endpoint

    return [Route(path, serve(read(name), media_type), methods=["GET"])
            for path, (name, media_type) in FILES.items()]
