"""The playground's static files (``servekit/playground/``), served at ``/playground``: no build
step, no CDN; the page asks for the API key itself, so these routes are open."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from servekit.errors import ServerError

PLAYGROUND_PATH = "/playground"
_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page talks only to this server; nothing else may load or run.
_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


def _file(name: str) -> Response:
    media_type = _MEDIA_TYPES.get(name)
    if media_type is None:
        raise ServerError(404, f"no playground file {name!r}")
    body = (resources.files("servekit") / "playground" / name).read_bytes()
    headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}
    return Response(body, media_type=media_type, headers=headers)


async def playground_page(request: Request) -> Response:
    return _file("index.html")


async def playground_file(request: Request) -> Response:
    return _file(str(request.path_params["name"]))
