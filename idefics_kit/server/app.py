"""The ASGI app: HTTP plumbing around the OpenAI-compatible routes of a :class:`~idefics_kit.Generator`.

:func:`create_app` returns a :class:`ServerApp`. Routes:

* ``POST /v1/chat/completions``: answered by :class:`~idefics_kit.server.chat.ChatHandler`
  through ``Generator.agenerate``, or ``Generator.astream`` as server-sent
  events; concurrent requests share the engine's batches.
* ``GET /v1/models`` and ``GET /v1/models/{model}``: the one served model.
* ``GET /health``: 200 ``{"status": "ok"}``; 503 while draining or while the
  generator cannot take work (``Generator.ready`` is False).
* ``GET /metrics``: Prometheus text (see :mod:`idefics_kit.server.metrics`).
* ``GET /``, ``GET /playground.js``, ``GET /playground.css``: the playground, a chat
  page over this API (see :mod:`idefics_kit.server.playground`); public, like
  ``/health``, and left out with ``playground=False``.

This module is the plumbing every request goes through, in this order:
match the route (as Starlette routes: the path without the mount prefix or
``root_path``), check the API key on every route but ``/health``, the playground's
(and ``/metrics`` when ``metrics_without_key``), refuse new requests while
draining, and, for a chat completion, read its body under a deadline and the
limits, count it against ``max_concurrent_requests`` once the body is in,
and hand it to the handler. After the response it counts the request for
``/metrics`` under labels from a fixed set and writes one access-log line.
Every refusal is an OpenAI-shaped error (:mod:`idefics_kit.server.errors`);
an unexpected failure is a 500 whose body names the request id and whose
traceback goes to the log only.

The server uses only the SDK's public API, as an application would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Message, Receive, Scope, Send

from idefics_kit.server import playground as page
from idefics_kit.server import schemas
from idefics_kit.server.chat import (
    ChatHandler,
    Exchange,
    ImageLimits,
    image_fit,
    model_not_found,
    send_error,
)
from idefics_kit.server.errors import APIError, internal_error, overloaded, shutting_down
from idefics_kit.server.metrics import CONTENT_TYPE, Metrics
from idefics_kit.server.schemas import ImagePolicy

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_DECODED_PIXELS",
    "DEFAULT_MAX_DOWNLOADS_PER_REQUEST",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_RECEIVING_REQUESTS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "ServerApp",
    "create_app",
]

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
"""Largest request body (bytes): a few large images as base64 ``data:`` URIs."""
DEFAULT_MAX_IMAGES = 8
"""Most images in one request."""
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest ``width * height`` of one image, checked from the header before decoding."""
DEFAULT_MAX_CONCURRENT_REQUESTS = 256
"""Most chat completions held at once once their body has arrived (decoded, queued or
generating); more get 503."""
DEFAULT_MAX_RECEIVING_REQUESTS = 64
"""Most chat completions whose body is still arriving; more get 503."""
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client has to send its whole request body; a slower one gets 408."""
DEFAULT_MAX_DECODED_PIXELS = 256 * 1024 * 1024
"""Decoded image pixels (after scaling down) held by all requests in flight together."""
DEFAULT_IMAGE_TIMEOUT = 30.0
"""Seconds a request may spend loading its images (downloads with DNS, decoding)."""
DEFAULT_MAX_DOWNLOADS_PER_REQUEST = 4
"""Most image downloads one request runs at once."""

CHAT_PATH = "/v1/chat/completions"
_OPEN_ROUTES = frozenset({"/health"})
_DRAIN_OPEN_ROUTES = frozenset({"/health", "/metrics"})
_OTHER_ROUTE = "other"

logger = logging.getLogger("idefics_kit.server")
access_logger = logging.getLogger("idefics_kit.server.access")


class _Disconnected(Exception):
    """The client went away before its request was read."""


def create_app(
    generator: Generator,
    *,
    served_model_name: str = "idefics-kit",
    api_key: str | None = None,
    metrics_without_key: bool = False,
    allow_private_network: bool = False,
    allowed_local_media_path: str | None = None,
    max_images_per_request: int = DEFAULT_MAX_IMAGES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
    image_timeout: float = DEFAULT_IMAGE_TIMEOUT,
    max_downloads_per_request: int = DEFAULT_MAX_DOWNLOADS_PER_REQUEST,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    max_receiving_requests: int = DEFAULT_MAX_RECEIVING_REQUESTS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    request_timeout: float | None = None,
    playground: bool = True,
) -> ServerApp:
    """The OpenAI-compatible ASGI app for ``generator``.

    Mount it in another ASGI app, serve it with any ASGI server, or test it
    in-process (``httpx.ASGITransport``). ``served_model_name`` is the id
    ``/v1/models`` lists and requests must name (or leave out).

    ``api_key`` (empty or None: no key) is required as ``Authorization:
    Bearer <key>`` on every route except ``/health``, the playground page's
    (and ``/metrics`` when ``metrics_without_key``), wherever the app is
    mounted. ``playground=False`` leaves the page out: ``GET /`` is then a 404. Image URLs from
    private addresses are refused unless ``allow_private_network``; local
    files only under ``allowed_local_media_path``. ``request_timeout``
    (seconds) bounds each request's wait for the engine plus its generation.

    The limits, and what each bounds (docs/server.md, "Security", gives the
    memory they add up to):

    * ``max_receiving_requests`` bodies arriving at once, each within
      ``body_timeout`` seconds (408 after) and ``max_request_bytes`` (413);
    * ``max_concurrent_requests`` chat completions held once their body is in;
    * ``max_images_per_request`` images of at most ``max_image_pixels`` each,
      scaled down right after decoding to what the model's processor uses;
      ``max_decoded_pixels`` of them held by all requests together (a request
      waits up to ``image_timeout`` for room, then gets 503);
    * per request, ``image_timeout`` seconds to load all its images (DNS
      included) and ``max_downloads_per_request`` downloads at once.

    The app does not own ``generator``: closing it is the caller's job.
    """
    for name, value, low in (
        ("max_images_per_request", max_images_per_request, 0),
        ("max_image_pixels", max_image_pixels, 1),
        ("max_decoded_pixels", max_decoded_pixels, 1),
        ("max_downloads_per_request", max_downloads_per_request, 1),
        ("max_request_bytes", max_request_bytes, 1),
        ("max_concurrent_requests", max_concurrent_requests, 1),
        ("max_receiving_requests", max_receiving_requests, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, seconds in (("image_timeout", image_timeout), ("body_timeout", body_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError(f"{name} must be a number of seconds > 0, got {seconds!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"{name} must be a number of seconds > 0, got {seconds!r}")
    if not served_model_name:
        raise ValueError("served_model_name must not be empty")
    fit, keep_aspect = image_fit(generator)
    images = ImageLimits(
        max_images=max_images_per_request,
        max_decoded_pixels=max_decoded_pixels,
        timeout=float(image_timeout),
        max_downloads=max_downloads_per_request,
        fit=fit,
        keep_aspect=keep_aspect,
    )
    needed = max_images_per_request * images.reservation(max_image_pixels)
    if needed > max_decoded_pixels:
        raise ValueError(
            f"max_decoded_pixels={max_decoded_pixels} cannot hold one request's images: "
            f"{max_images_per_request} images of up to {images.reservation(max_image_pixels)} "
            f"pixels each once scaled down need {needed}; raise it or lower "
            "max_images_per_request"
        )
    policy = ImagePolicy(
        allow_private_network=allow_private_network,
        local_media_root=allowed_local_media_path,
        max_pixels=max_image_pixels,
    )
    return ServerApp(
        generator,
        served_model_name=served_model_name,
        api_key=api_key or None,
        metrics_without_key=metrics_without_key,
        policy=policy,
        images=images,
        max_request_bytes=max_request_bytes,
        max_concurrent=max_concurrent_requests,
        max_receiving=max_receiving_requests,
        body_timeout=float(body_timeout),
        request_timeout=request_timeout,
        playground=playground,
    )


class ServerApp:
    """The ASGI application :func:`create_app` returns.

    Besides being called as an ASGI app it offers what a process manager
    needs: :meth:`begin_drain` (new requests get 503, ``/health`` turns 503),
    :attr:`in_flight` and :meth:`wait_idle`, and :attr:`metrics`; and
    :meth:`add_route` for an application's own routes, which need the API key
    like every other.
    """

    def __init__(
        self,
        generator: Generator,
        *,
        served_model_name: str,
        api_key: str | None,
        metrics_without_key: bool,
        policy: ImagePolicy,
        images: ImageLimits,
        max_request_bytes: int,
        max_concurrent: int,
        max_receiving: int,
        body_timeout: float,
        request_timeout: float | None,
        playground: bool = True,
    ) -> None:
        self.generator = generator
        self.served_model_name = served_model_name
        self.metrics = Metrics()
        self.chat = ChatHandler(
            generator,
            served_model_name=served_model_name,
            policy=policy,
            images=images,
            request_timeout=request_timeout,
            metrics=self.metrics,
        )
        self._key_digest = None if api_key is None else _digest(api_key)
        self._open_routes = _OPEN_ROUTES | ({"/metrics"} if metrics_without_key else set())
        self._max_request_bytes = max_request_bytes
        self._max_concurrent = max_concurrent
        self._max_receiving = max_receiving
        self._body_timeout = body_timeout
        self._chats = 0
        self._receiving = 0
        self._created = schemas.now()
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._router = Starlette(
            routes=[
                Route(CHAT_PATH, self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ],
            exception_handlers={HTTPException: _http_exception},
            lifespan=self._lifespan,
        )
        if playground:
            # A fixed set of paths, each answering one file read now: nothing to traverse.
            for asset in page.assets():
                self.add_route(asset.path, page.endpoint(asset), public=True)

    # -- lifecycle --------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once :meth:`begin_drain` was called."""
        return self._draining

    @property
    def in_flight(self) -> int:
        """Requests being answered now (not counting ``/health`` and ``/metrics``)."""
        return self._active

    def begin_drain(self) -> None:
        """Refuse new requests with 503 from now on; requests in flight go on."""
        self._draining = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            return False
        return True

    def add_route(
        self,
        path: str,
        endpoint: Callable[[Request], Any],
        *,
        methods: Collection[str] = ("GET",),
        public: bool = False,
    ) -> None:
        """Serve ``endpoint`` (a Starlette endpoint) at ``path`` too.

        It needs the API key like every route unless ``public`` (as
        ``/health`` is); it is counted in ``/metrics`` under ``path``.
        """
        self._router.router.routes.append(Route(path, endpoint, methods=list(methods)))
        if public:
            self._open_routes = self._open_routes | {path}

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        self.chat.close()

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return
        started = time.monotonic()
        exchange = Exchange(request_id=f"chatcmpl-{uuid.uuid4().hex}")
        scope["idefics_kit.exchange"] = exchange
        # The route the router will pick, from the path it routes on (without
        # the mount prefix or root_path): the key and the labels go by it.
        route = self._route_of(scope)
        counted = route not in _DRAIN_OPEN_ROUTES

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                request_id = (b"x-request-id", exchange.request_id.encode())
                message = {**message, "headers": [*message.get("headers", ()), request_id]}
            await send(message)

        if counted:
            self._enter()
        try:
            refusal = self._refusal(scope, route)
            if refusal is not None:
                await send_error(tracking_send, refusal)
            else:
                await self._router(scope, receive, tracking_send)
        except Exception:
            logger.exception("request %s failed", exchange.request_id)
            if exchange.status == 0:
                await send_error(tracking_send, internal_error(exchange.request_id))
        finally:
            if counted:
                self._leave()
            elapsed = time.monotonic() - started
            status = 499 if exchange.disconnected else exchange.status
            self.metrics.request_done(scope["method"], route, status, elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(_access_line(scope, exchange, status, elapsed))

    def _route_of(self, scope: Scope) -> str:
        """The path template of the route that will answer ``scope``, or ``"other"``."""
        for candidate in self._router.router.routes:
            match, _ = candidate.matches(scope)
            # PARTIAL: the path matches but not the method (a 405 from that route).
            if match is not Match.NONE:
                return _template(candidate)
        return _OTHER_ROUTE

    def _enter(self) -> None:
        self._active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def _refusal(self, scope: Scope, route: str) -> APIError | None:
        if self._draining and route not in _DRAIN_OPEN_ROUTES:
            return shutting_down()
        # Deny by default: every route needs the key unless named open, unknown paths too.
        if self._key_digest is None or route in self._open_routes:
            return None
        header = _header(scope, b"authorization")
        scheme, _, token = (header or "").partition(" ")
        if header is None or scheme.lower() != "bearer" or not token.strip():
            return APIError(
                401,
                "Missing API key: send it as the header 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Comparing digests keeps the time independent of where and whether the keys differ.
        if not hmac.compare_digest(_digest(token.strip()), self._key_digest):
            return APIError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    # -- small routes -------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        return JSONResponse(schemas.models_body(self.served_model_name, self._created))

    async def _model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.served_model_name:
            return _error_response(model_not_found(name))
        return JSONResponse(schemas.model_body(self.served_model_name, self._created))

    async def _health(self, request: Request) -> Response:
        if self._draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.generator.ready:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        self.metrics.in_flight = self._active
        self.metrics.gauges(receiving=self._receiving, pixels=self.chat.images.budget.held)
        snapshot = self.generator.stats()
        return Response(self.metrics.render(snapshot), media_type=CONTENT_TYPE)

    # -- chat completions: reading the body ---------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return _Completion(self)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read one chat-completion body under the limits, then let the handler answer it."""
        exchange: Exchange = scope["idefics_kit.exchange"]
        try:
            body = await self._received(scope, receive)
        except _Disconnected:
            exchange.disconnected = True
            return
        except APIError as exc:
            await send_error(send, exc)
            return
        # Only requests whose body has arrived count here: a slow sender holds a
        # receiving slot (and only until its deadline), never an answering one.
        if self._chats >= self._max_concurrent:
            error = overloaded(f"{self._chats} requests are being answered (the most it holds)")
            await send_error(send, error)
            return
        self._chats += 1
        # Handed over in a box so that the handler can drop the body once parsed.
        box = [body]
        del body
        try:
            await self.chat.answer(box, exchange, receive, send)
        finally:
            self._chats -= 1

    async def _received(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._max_request_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isascii() or not declared.isdigit():
                raise APIError(400, "invalid Content-Length header", code="invalid_request")
            if int(declared) > limit:
                raise _too_large(limit, f"declared {declared} bytes")
        if self._receiving >= self._max_receiving:
            raise overloaded(f"{self._receiving} requests are still sending their bodies")
        self._receiving += 1
        try:
            return await asyncio.wait_for(self._read_body(receive, limit), self._body_timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise APIError(
                408,
                f"The request body did not arrive within {self._body_timeout:g} s; send it "
                "at once.",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
        finally:
            self._receiving -= 1

    @staticmethod
    async def _read_body(receive: Receive, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            body: bytes = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise _too_large(limit, f"received more than {limit} bytes")
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Completion(Response):
    """The response object of the chat route: it reads the body and answers itself."""

    def __init__(self, app: ServerApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app.answer(scope, receive, send)


# -- helpers ------------------------------------------------------------------------------


def _template(route: BaseRoute) -> str:
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else _OTHER_ROUTE


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _too_large(limit: int, detail: str) -> APIError:
    return APIError(
        413,
        f"The request body is too large ({detail}); this server takes at most {limit} bytes. "
        "Send smaller or fewer images.",
        code="request_too_large",
        headers={"Connection": "close"},
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    shown = path if len(path) <= 200 else path[:100] + "..."
    error = APIError(
        exc.status_code,
        f"{request.method[:20]} {shown}: {exc.detail}",
        code="not_found" if exc.status_code == 404 else "method_not_allowed",
        headers=exc.headers,
    )
    return _error_response(error)


def _error_response(error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _access_line(scope: Scope, exchange: Exchange, status: int, seconds: float) -> str:
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    tokens = (
        f"tokens={exchange.prompt_tokens}+{exchange.completion_tokens}"
        if exchange.prompt_tokens is not None
        else "tokens=-"
    )
    notes = "".join(f" ({note})" for note in exchange.notes or ())
    path: str = scope["path"]
    shown = path if len(path) <= 200 else path[:100] + "..."
    return (
        f'{peer} "{scope["method"][:20]} {shown}" {status} {tokens} {seconds:.3f}s '
        f"{exchange.request_id}{notes}"
    )
