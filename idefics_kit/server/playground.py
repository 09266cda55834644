"""The playground page: ``GET /`` answers a chat page over the server's own API.

Three files of package data (``idefics_kit/server/static/``: ``index.html``,
``app.js``, ``style.css``), plain HTML, CSS and JavaScript with no build step,
served at a fixed set of paths: there is no path parameter, so no request can
name another file. They are read once, when the app is created.

The page asks nothing of any other origin, and every response carries a
Content-Security-Policy that holds it to that: scripts and styles only from
these files (no inline script, no inline event handler, no ``eval``), images
only from this origin or ``data:``/``blob:`` URIs (the pictures a user
attaches), requests only to this origin, no frames, forms or ``<base>``.
The routes are public (the page must load before the user has typed the API
key); the API routes it calls still need the key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_HEADERS", "Asset", "assets", "endpoint"]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
"""What the page may load and run: its own script and stylesheet, pictures from ``data:``
URIs, requests to its own origin; nothing inline, nothing from elsewhere."""

PAGE_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: a new version of the package shows at the next reload.
    "Cache-Control": "no-cache",
}
"""Headers on every response of the page's routes."""

_FILES = (
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/playground.js", "app.js", "text/javascript; charset=utf-8"),
    ("/playground.css", "style.css", "text/css; charset=utf-8"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Asset:
    """One file of the page: the route ``path`` answers ``body`` as ``media_type``."""

    path: str
    body: bytes
    media_type: str


def assets() -> tuple[Asset, ...]:
    """The page's files, read from the package data."""
    folder = resources.files("idefics_kit.server").joinpath("static")
    return tuple(
        Asset(path=path, body=folder.joinpath(name).read_bytes(), media_type=media_type)
        for path, name, media_type in _FILES
    )


def endpoint(asset: Asset) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint that answers ``asset`` with the page's headers."""
    headers = {**PAGE_HEADERS, "Content-Type": asset.media_type}

    async def serve(request: Request) -> Response:
        return Response(asset.body, headers=headers)

    return serve
