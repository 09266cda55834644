"""The ASGI app: OpenAI-compatible routes on a :class:`~idefics_kit.Generator`.

:func:`create_app` returns a :class:`ServerApp`. Routes:

* ``POST /v1/chat/completions``: answers through ``Generator.agenerate``, or
  ``Generator.astream`` as server-sent events; concurrent requests share the
  engine's batches.
* ``GET /v1/models`` and ``GET /v1/models/{id}``: the one served model.
* ``GET /health``: 200 ``{"status": "ok"}``; 503 while draining.
* ``GET /metrics``: Prometheus text (see :mod:`idefics_kit.server.metrics`).

Around every request the app checks the API key (``/v1/...`` only, compared
in constant time), refuses new requests while draining, counts the request
for ``/metrics`` and writes one access-log line. Every refusal is an
OpenAI-shaped error (:mod:`idefics_kit.server.errors`); an unexpected failure
is a 500 whose body names the request id and whose traceback goes to the log
only. A client that disconnects cancels its generation: its engine row is
freed at the next decoding step.

The server uses only the SDK's public API, as an application would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from idefics_kit.conversation import Conversation, Turn
from idefics_kit.errors import IdeficsKitError, ImageLoadError
from idefics_kit.images import ImagePart
from idefics_kit.results import Result
from idefics_kit.server import schemas
from idefics_kit.server.errors import (
    APIError,
    from_sdk_error,
    internal_error,
    overloaded,
    shutting_down,
)
from idefics_kit.server.metrics import CONTENT_TYPE, Metrics
from idefics_kit.server.schemas import ChatRequest, ImagePolicy

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = [
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_PIXELS",
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
"""Most chat completions held at once (read, decoded, queued or generating); more get 503."""

CHAT_PATH = "/v1/chat/completions"
_ROUTES = frozenset({CHAT_PATH, "/v1/models", "/health", "/metrics"})
_OPEN_PATHS = frozenset({"/health", "/metrics"})
_IMAGE_THREADS = 8
_JSON = "application/json"

logger = logging.getLogger("idefics_kit.server")
access_logger = logging.getLogger("idefics_kit.server.access")


class _Disconnected(Exception):
    """The client went away before its request was read."""


@dataclass(slots=True)
class _Exchange:
    """What the middleware learns about one request, for metrics and the access log."""

    request_id: str
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    disconnected: bool = False
    notes: list[str] = field(default_factory=list)


def create_app(
    generator: Generator,
    *,
    served_model_name: str = "idefics-kit",
    api_key: str | None = None,
    allow_private_network: bool = False,
    allowed_local_media_path: str | None = None,
    max_images_per_request: int = DEFAULT_MAX_IMAGES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    request_timeout: float | None = None,
) -> ServerApp:
    """The OpenAI-compatible ASGI app for ``generator``.

    Mount it in another ASGI app, serve it with any ASGI server, or test it
    in-process (``httpx.ASGITransport``). ``served_model_name`` is the id
    ``/v1/models`` lists and requests must name (or leave out).
    ``api_key`` (empty or None: no key) is required as ``Authorization:
    Bearer <key>`` on ``/v1/...``. Image URLs from private addresses are
    refused unless ``allow_private_network``; local files only under
    ``allowed_local_media_path``. ``request_timeout`` (seconds) bounds each
    request's wait for the engine plus its generation.

    Memory is bounded by the limits together: at most
    ``max_concurrent_requests`` chat completions are held at once (a request
    beyond that gets 503 before its body is read), each with a body of at most
    ``max_request_bytes`` and at most ``max_images_per_request`` decoded
    images of at most ``max_image_pixels`` RGB pixels.

    The app does not own ``generator``: closing it is the caller's job.
    """
    if max_images_per_request < 0 or min(max_request_bytes, max_image_pixels) < 1:
        raise ValueError(
            "max_images_per_request must be >= 0, max_request_bytes and max_image_pixels >= 1"
        )
    if max_concurrent_requests < 1:
        raise ValueError("max_concurrent_requests must be >= 1")
    if not served_model_name:
        raise ValueError("served_model_name must not be empty")
    policy = ImagePolicy(
        allow_private_network=allow_private_network,
        local_media_root=allowed_local_media_path,
        max_pixels=max_image_pixels,
    )
    return ServerApp(
        generator,
        served_model_name=served_model_name,
        api_key=api_key or None,
        policy=policy,
        max_images=max_images_per_request,
        max_request_bytes=max_request_bytes,
        max_concurrent=max_concurrent_requests,
        request_timeout=request_timeout,
    )


class ServerApp:
    """The ASGI application :func:`create_app` returns.

    Besides being called as an ASGI app it offers what a process manager
    needs: :meth:`begin_drain` (new requests get 503, ``/health`` turns 503),
    :attr:`in_flight` and :meth:`wait_idle`, and :attr:`metrics`.
    """

    def __init__(
        self,
        generator: Generator,
        *,
        served_model_name: str,
        api_key: str | None,
        policy: ImagePolicy,
        max_images: int,
        max_request_bytes: int,
        max_concurrent: int,
        request_timeout: float | None,
    ) -> None:
        self.generator = generator
        self.served_model_name = served_model_name
        self.metrics = Metrics()
        self._key_digest = None if api_key is None else _digest(api_key)
        self._policy = policy
        self._max_images = max_images
        self._max_request_bytes = max_request_bytes
        self._max_concurrent = max_concurrent
        self._chats = 0
        self._timeout = request_timeout
        self._created = schemas.now()
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor: ThreadPoolExecutor | None = None
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

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return
        started = time.monotonic()
        exchange = _Exchange(request_id=f"chatcmpl-{uuid.uuid4().hex}")
        scope["idefics_kit.exchange"] = exchange
        path: str = scope["path"]
        counted = path not in _OPEN_PATHS

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                request_id = (b"x-request-id", exchange.request_id.encode())
                message = {**message, "headers": [*message.get("headers", ()), request_id]}
            await send(message)

        if counted:
            self._enter()
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_error(tracking_send, refusal)
            else:
                await self._router(scope, receive, tracking_send)
        except Exception:
            logger.exception("request %s failed", exchange.request_id)
            if exchange.status == 0:
                await _send_error(tracking_send, internal_error(exchange.request_id))
        finally:
            if counted:
                self._leave()
            elapsed = time.monotonic() - started
            status = 499 if exchange.disconnected else exchange.status
            route = (
                path
                if path in _ROUTES
                else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            )
            self.metrics.request_done(scope["method"], route, status, elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(_access_line(scope, exchange, status, elapsed))

    def _enter(self) -> None:
        self._active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def _refusal(self, scope: Scope) -> APIError | None:
        path: str = scope["path"]
        if self._draining and path not in _OPEN_PATHS:
            return shutting_down()
        if self._key_digest is None or not path.startswith("/v1/"):
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
            return _error_response(_model_not_found(name))
        return JSONResponse(schemas.model_body(self.served_model_name, self._created))

    async def _health(self, request: Request) -> Response:
        if self._draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        self.metrics.in_flight = self._active
        stats = getattr(self.generator, "stats", None)
        snapshot = stats() if callable(stats) else None
        return Response(self.metrics.render(snapshot), media_type=CONTENT_TYPE)

    # -- chat completions ---------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return _Completion(self)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read, check and answer one chat-completion request (called by :class:`_Completion`)."""
        if self._chats >= self._max_concurrent:
            error = overloaded(f"{self._chats} requests are being answered (the most it holds)")
            await _send_error(send, error)
            return
        self._chats += 1
        try:
            await self._answer(scope, receive, send)
        finally:
            self._chats -= 1

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange: _Exchange = scope["idefics_kit.exchange"]
        try:
            chat = self._parse(await self._read_body(scope, receive))
        except _Disconnected:
            exchange.disconnected = True
            return
        except APIError as exc:
            await _send_error(send, exc)
            return
        if chat.stream:
            work: Callable[[], Awaitable[None]] = lambda: self._stream(chat, exchange, send)  # noqa: E731
        else:
            work = lambda: self._complete(chat, exchange, send)  # noqa: E731
        finished = await _unless_disconnected(work(), receive)
        if not finished:
            exchange.disconnected = True

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._max_request_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, "invalid Content-Length header", code="invalid_request")
            if int(declared) > limit:
                raise _too_large(limit, f"declared {declared} bytes")
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

    def _parse(self, body: bytes) -> ChatRequest:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise APIError(
                400,
                f"The request body is not valid JSON ({exc}); send a JSON object.",
                code="invalid_json",
            ) from exc
        chat = schemas.parse_chat_request(data, self._policy, max_images=self._max_images)
        if chat.model is not None and chat.model != self.served_model_name:
            raise _model_not_found(chat.model)
        return chat

    async def _prepared(self, chat: ChatRequest) -> Conversation:
        """The conversation with every image read and decoded, in a worker thread."""
        if not chat.conversation.images():
            return chat.conversation
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_IMAGE_THREADS, "idefics-kit-images")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, _decoded, chat.conversation)
        except ImageLoadError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_image") from exc

    def _error(self, exc: BaseException, chat: ChatRequest, exchange: _Exchange) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, IdeficsKitError):
            error = from_sdk_error(exc, exchange.request_id, chat.parameters)
            if error.status >= 500 and error.code == "internal_error":
                logger.error("request %s failed", exchange.request_id, exc_info=exc)
            return error
        logger.error("request %s failed", exchange.request_id, exc_info=exc)
        return internal_error(exchange.request_id)

    def _finished(self, result: Result, exchange: _Exchange) -> None:
        exchange.prompt_tokens = result.usage.prompt_tokens
        exchange.completion_tokens = result.usage.completion_tokens
        self.metrics.completion_done(
            result.usage.prompt_tokens, result.usage.completion_tokens, result.finish_reason
        )

    async def _complete(self, chat: ChatRequest, exchange: _Exchange, send: Send) -> None:
        try:
            conversation = await self._prepared(chat)
            result = await self.generator.agenerate(
                conversation, chat.options, timeout=self._timeout
            )
        except Exception as exc:
            await _send_error(send, self._error(exc, chat, exchange))
            return
        self._finished(result, exchange)
        body = schemas.completion_body(
            exchange.request_id, schemas.now(), self.served_model_name, result
        )
        await _send_json(send, 200, body)

    async def _stream(self, chat: ChatRequest, exchange: _Exchange, send: Send) -> None:
        started = time.monotonic()
        created = schemas.now()
        include_usage = chat.include_usage

        def event(**fields: Any) -> bytes:
            body = schemas.chunk(
                exchange.request_id,
                created,
                self.served_model_name,
                include_usage=include_usage,
                **fields,
            )
            return _sse(body)

        stream: Any = None
        try:
            conversation = await self._prepared(chat)
            stream = self.generator.astream(conversation, chat.options, timeout=self._timeout)
            # The first piece is awaited before the 200 goes out, so that a full
            # queue or a bad input still gets its own status.
            first: str | None
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                first = None
        except Exception as exc:
            await _close(stream)
            await _send_error(send, self._error(exc, chat, exchange))
            return
        except BaseException:  # cancelled: the client went away
            await _close(stream)
            raise
        self.metrics.first_token(time.monotonic() - started)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await _body(send, event(delta={"role": "assistant", "content": ""}))
            if first:
                await _body(send, event(delta={"content": first}))
            if first is not None:
                async for piece in stream:
                    if piece:
                        await _body(send, event(delta={"content": piece}))
            result: Result = stream.result
            self._finished(result, exchange)
            # Log-probabilities, when asked for, come whole with the last chunk: pieces
            # are text, not tokens, so the chunks cannot split them exactly.
            logprobs = schemas.logprobs_body(result)
            await _body(
                send, event(delta={}, finish_reason=result.finish_reason, logprobs=logprobs)
            )
            if include_usage:
                await _body(send, event(usage=schemas.usage_body(result)))
        except Exception as exc:
            # The 200 is out: report the failure as an error event, as OpenAI does.
            error = self._error(exc, chat, exchange)
            exchange.notes.append(f"stream error {error.status}")
            await _body(send, _sse(error.body()))
        finally:
            await _close(stream)
        await _body(send, b"data: [DONE]\n\n", more=False)


class _Completion(Response):
    """The response object of the chat route: it reads the body and answers itself."""

    def __init__(self, app: ServerApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app.answer(scope, receive, send)


# -- helpers ------------------------------------------------------------------------------


def _decoded(conversation: Conversation) -> Conversation:
    """``conversation`` with each image loaded now (fetched, decoded) as a PIL-backed part."""
    turns = []
    for turn in conversation.turns:
        parts = tuple(
            ImagePart.from_pil(part.load(), max_pixels=part.max_pixels)
            if isinstance(part, ImagePart)
            else part
            for part in turn.parts
        )
        turns.append(Turn(role=turn.role, parts=parts))
    return Conversation(system=conversation.system, turns=tuple(turns))


async def _unless_disconnected(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work`` until it ends (True) or the client disconnects (False: it is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        # Wait for the cancelled work to unwind (its finally closes the stream).
        await asyncio.wait({task, watcher})
    if task.cancelled():
        return False
    exc = task.exception()
    if exc is not None:
        raise exc
    return True


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await asyncio.shield(close())


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


def _model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model {name[:200]!r} does not exist on this server; GET /v1/models lists the one "
        "it serves.",
        param="model",
        code="model_not_found",
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    error = APIError(
        exc.status_code,
        f"{request.method} {request.url.path}: {exc.detail}",
        code="not_found" if exc.status_code == 404 else "method_not_allowed",
        headers=exc.headers,
    )
    return _error_response(error)


def _error_response(error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _send_json(
    send: Send, status: int, body: object, headers: Mapping[str, str] | None = None
) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode()
    raw = [
        (b"content-type", _JSON.encode()),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _send_error(send: Send, error: APIError) -> None:
    await _send_json(send, error.status, error.body(), error.headers)


async def _body(send: Send, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


def _sse(body: object) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _access_line(scope: Scope, exchange: _Exchange, status: int, seconds: float) -> str:
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    tokens = (
        f"tokens={exchange.prompt_tokens}+{exchange.completion_tokens}"
        if exchange.prompt_tokens is not None
        else "tokens=-"
    )
    notes = "".join(f" ({note})" for note in exchange.notes)
    return (
        f'{peer} "{scope["method"]} {scope["path"]}" {status} {tokens} {seconds:.3f}s '
        f"{exchange.request_id}{notes}"
    )
