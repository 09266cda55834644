"""``POST /v1/chat/completions``: from a request body to an answer, plain or streamed.

:class:`ChatHandler` gets the body that :mod:`idefics_kit.server.app` has
read (and counted), and:

1. parses it (:func:`~idefics_kit.server.schemas.parse_chat_request`), in a
   worker thread when it is large (parsing JSON and decoding base64 images
   of a 32 MiB body would stall every other client on the event loop);
2. loads its images (:class:`ImageLoader`): reserving room in the server's
   budget of decoded pixels first, downloading URLs in their own thread pool
   (a few at a time per request, all by one deadline that includes DNS) and
   decoding in another, so that ``data:`` and local images never queue behind
   slow downloads; every image is scaled down right after decoding to what
   the model's processor resizes it to;
3. answers through ``Generator.agenerate`` or ``Generator.astream``.

A client that disconnects cancels all of it: its downloads stop and its
engine row is freed at the next decoding step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image
from starlette.types import Receive, Send

from idefics_kit._quote import short_repr
from idefics_kit.conversation import Conversation, Turn
from idefics_kit.errors import IdeficsKitError, ImageLoadError
from idefics_kit.images import Cancellation, ImagePart
from idefics_kit.results import Result
from idefics_kit.server import schemas
from idefics_kit.server.errors import (
    APIError,
    capped,
    from_sdk_error,
    internal_error,
    overloaded,
)
from idefics_kit.server.metrics import Metrics
from idefics_kit.server.schemas import ChatRequest, ImagePolicy

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = [
    "DECODE_THREADS",
    "DOWNLOAD_THREADS",
    "ChatHandler",
    "Exchange",
    "ImageLimits",
    "PixelBudget",
    "image_fit",
]

logger = logging.getLogger("idefics_kit.server")

DECODE_THREADS = 4
"""Threads decoding images for all requests: at most this many full-size images exist at once."""
DOWNLOAD_THREADS = 32
"""Threads waiting on image downloads for all requests."""
PARSE_IN_THREAD_BYTES = 64 * 1024
"""Bodies larger than this are parsed (JSON, base64) in a worker thread."""


@dataclass(slots=True)
class Exchange:
    """What the handler tells the middleware about one request: metrics and the access log."""

    request_id: str
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    disconnected: bool = False
    notes: list[str] | None = None

    def note(self, text: str) -> None:
        """Add a note to the access-log line."""
        if self.notes is None:
            self.notes = []
        self.notes.append(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageLimits:
    """How a server loads the images of its requests."""

    max_images: int
    """Most images in one request."""
    max_decoded_pixels: int
    """Budget of decoded pixels held by all requests in flight together."""
    timeout: float
    """Seconds a request may spend loading its images: waiting for room, downloads (DNS
    included) and decoding."""
    max_downloads: int
    """Most downloads one request runs at once."""
    fit: tuple[int, int] | None = None
    """The box images are scaled down to right after decoding (None: kept as decoded)."""
    keep_aspect: bool = True

    def reservation(self, max_pixels: int) -> int:
        """Pixels reserved for one image before it is decoded: the most it can keep."""
        if self.fit is None:
            return max_pixels
        return min(max_pixels, self.fit[0] * self.fit[1])


def image_fit(generator: Generator) -> tuple[tuple[int, int] | None, bool]:
    """The largest image the generator's processor uses, and whether it keeps the aspect ratio.

    ``Generator.image_box`` (each family's adapter knows its processor's
    resizing). An image already within the box is never changed, so answers
    about it are the same as in-process. ``(None, True)`` for a generator
    that cannot say (a test double): images are then kept as decoded.
    """
    box = getattr(generator, "image_box", None)
    if not isinstance(box, tuple):
        return None, True
    return box


class PixelBudget:
    """Decoded pixels held by all requests in flight, under a limit; waiters are served in order.

    A request reserves room for all its images at once (the most each can
    keep once scaled down), so that no request holds part of the budget while
    waiting for more; once an image is decoded its reservation shrinks to
    what it really keeps. Everything is released when the request ends.
    Used on the event loop only.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, pixels: int, timeout: float) -> bool:
        """Reserve ``pixels``; False if there was no room within ``timeout`` seconds."""
        if pixels > self.limit:
            return False
        if not self._waiters and self.held + pixels <= self.limit:
            self.held += pixels
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            # Granted just as the wait ended: keep it.
            return self._withdraw(entry)
        except asyncio.CancelledError:
            if self._withdraw(entry):
                self.release(pixels)
            raise
        return True

    def _withdraw(self, entry: tuple[int, asyncio.Future[None]]) -> bool:
        """Stop waiting; True if the room was granted meanwhile."""
        _, future = entry
        if future.done():
            return True
        future.cancel()
        self._waiters.remove(entry)
        self._wake()
        return False

    def release(self, pixels: int) -> None:
        """Give back ``pixels`` reserved earlier."""
        self.held -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            pixels, future = self._waiters[0]
            if self.held + pixels > self.limit:
                return
            self._waiters.popleft()
            self.held += pixels
            future.set_result(None)


class ImageLoader:
    """Loads the images of requests: the thread pools and the pixel budget they share."""

    def __init__(self, limits: ImageLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.budget = PixelBudget(limits.max_decoded_pixels)
        self._metrics = metrics
        self._decoder: ThreadPoolExecutor | None = None
        self._downloader: ThreadPoolExecutor | None = None
        self._bodies: asyncio.Semaphore | None = None

    def close(self) -> None:
        """Stop the thread pools (work not started is dropped)."""
        for pool in (self._decoder, self._downloader):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._decoder = self._downloader = None

    async def load(self, conversation: Conversation, held: list[int]) -> Conversation:
        """``conversation`` with every image decoded (and scaled down) as a PIL-backed part.

        The pixels it keeps are added to ``held[0]``; the caller releases them
        from :attr:`budget` when the request ends, whatever happened.
        """
        parts = conversation.images()
        if not parts:
            return conversation
        limits = self.limits
        started = time.monotonic()
        deadline = started + limits.timeout
        reserved = [limits.reservation(part.max_pixels) for part in parts]
        if not await self.budget.acquire(sum(reserved), limits.timeout):
            raise overloaded(
                f"the images of the requests in flight fill the server's budget of "
                f"{limits.max_decoded_pixels} decoded pixels"
            )
        held[0] += sum(reserved)
        cancellation = Cancellation()
        downloads = asyncio.Semaphore(limits.max_downloads)
        loop = asyncio.get_running_loop()

        if self._bodies is None:
            self._bodies = asyncio.Semaphore(DOWNLOAD_THREADS)
        bodies = self._bodies

        async def one(index: int, part: ImagePart) -> ImagePart:
            decoder = self._pool("decode")
            if part.kind == "url":
                # A downloaded body holds its slots until it is decoded: at most
                # DOWNLOAD_THREADS bodies exist at once, whatever the requests.
                async with downloads, bodies:
                    fetched = await loop.run_in_executor(
                        self._pool("download"), _fetch, part, deadline, cancellation
                    )
                    image = await loop.run_in_executor(decoder, _decode, fetched, limits)
            else:
                image = await loop.run_in_executor(decoder, _decode, part, limits)
            # Keep only what the image really holds from now on.
            kept = min(reserved[index], image.width * image.height)
            self.budget.release(reserved[index] - kept)
            held[0] -= reserved[index] - kept
            reserved[index] = kept
            return ImagePart.from_pil(image, max_pixels=part.max_pixels)

        tasks = [asyncio.ensure_future(one(i, part)) for i, part in enumerate(parts)]
        try:
            remaining = max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(
                tasks, timeout=remaining, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in done:
                task.result()  # the first failure, if any, is the answer
            if pending:
                raise _image_timeout(limits.timeout)
            loaded = [task.result() for task in tasks]
        except ImageLoadError as exc:
            if time.monotonic() >= deadline:  # a download ended by the request's deadline
                raise _image_timeout(limits.timeout) from exc
            raise APIError(400, capped(str(exc)), param="messages", code="invalid_image") from exc
        finally:
            # A failure, a timeout or a client that left: stop the rest now.
            cancellation.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return _with_images(conversation, loaded)

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        if kind == "decode":
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(DECODE_THREADS, "idefics-kit-decode")
            return self._decoder
        if self._downloader is None:
            self._downloader = ThreadPoolExecutor(DOWNLOAD_THREADS, "idefics-kit-download")
        return self._downloader


def _image_timeout(seconds: float) -> APIError:
    return APIError(
        400,
        f"loading the request's images took longer than {seconds:g} s (this server's "
        "image timeout); send smaller images or ones that download faster",
        param="messages",
        code="image_timeout",
    )


def _fetch(part: ImagePart, deadline: float, cancellation: Cancellation) -> ImagePart:
    return part.fetched(deadline=deadline, cancellation=cancellation)


def _decode(part: ImagePart, limits: ImageLimits) -> Image.Image:
    return part.load(max_size=limits.fit, keep_aspect=limits.keep_aspect)


def _with_images(conversation: Conversation, loaded: list[ImagePart]) -> Conversation:
    images = iter(loaded)
    turns = []
    for turn in conversation.turns:
        parts = tuple(next(images) if isinstance(p, ImagePart) else p for p in turn.parts)
        turns.append(Turn(role=turn.role, parts=parts))
    return Conversation(system=conversation.system, turns=tuple(turns))


class ChatHandler:
    """Answers chat completions with one generator (see the module docstring)."""

    def __init__(
        self,
        generator: Generator,
        *,
        served_model_name: str,
        policy: ImagePolicy,
        images: ImageLimits,
        request_timeout: float | None,
        metrics: Metrics,
    ) -> None:
        self.generator = generator
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.images = ImageLoader(images, metrics)
        self._policy = policy
        self._max_images = images.max_images
        self._timeout = request_timeout

    def close(self) -> None:
        """Stop the image thread pools."""
        self.images.close()

    async def answer(
        self, box: list[bytes], exchange: Exchange, receive: Receive, send: Send
    ) -> None:
        """Parse the body in ``box`` and answer it on ``send``; a disconnect cancels the work.

        The body is taken out of ``box`` and dropped once parsed, and the
        parsed conversation (with its encoded images) once its images are
        decoded: a request holds its encoded images only while loading them.
        """
        body = box.pop()
        try:
            if len(body) > PARSE_IN_THREAD_BYTES:
                parsed = await asyncio.to_thread(self.parse, body)
            else:
                parsed = self.parse(body)
        except APIError as exc:
            await send_error(send, exc)
            return
        del body
        pending = [parsed.conversation]
        chat = dataclasses.replace(parsed, conversation=_NO_CONVERSATION)
        del parsed
        if chat.stream:
            work: Callable[[], Awaitable[None]] = lambda: self._stream(  # noqa: E731
                chat, pending, exchange, send
            )
        else:
            work = lambda: self._complete(chat, pending, exchange, send)  # noqa: E731
        finished = await _unless_disconnected(work(), receive)
        if not finished:
            exchange.disconnected = True

    def parse(self, body: bytes) -> ChatRequest:
        """The checked request in ``body``; :class:`APIError` (400, 404) if it is wrong."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise APIError(
                400,
                f"The request body is not valid JSON ({str(exc)[:200]}); send a JSON object.",
                code="invalid_json",
            ) from exc
        chat = schemas.parse_chat_request(data, self._policy, max_images=self._max_images)
        if chat.model is not None and chat.model != self.served_model_name:
            raise model_not_found(chat.model)
        return chat

    def _error(self, exc: BaseException, chat: ChatRequest, exchange: Exchange) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, IdeficsKitError):
            error = from_sdk_error(exc, exchange.request_id, chat.parameters)
            if error.status >= 500 and error.code == "internal_error":
                logger.error("request %s failed", exchange.request_id, exc_info=exc)
            return error
        logger.error("request %s failed", exchange.request_id, exc_info=exc)
        return internal_error(exchange.request_id)

    def _finished(self, result: Result, exchange: Exchange) -> None:
        exchange.prompt_tokens = result.usage.prompt_tokens
        exchange.completion_tokens = result.usage.completion_tokens
        self.metrics.completion_done(
            result.usage.prompt_tokens, result.usage.completion_tokens, result.finish_reason
        )
        if result.timing is not None:
            self.metrics.stages(result.timing)

    async def _complete(
        self, chat: ChatRequest, pending: list[Conversation], exchange: Exchange, send: Send
    ) -> None:
        held = [0]
        try:
            conversation = await self.images.load(pending.pop(), held)
            result = await self.generator.agenerate(
                conversation, chat.options, timeout=self._timeout
            )
        except Exception as exc:
            await send_error(send, self._error(exc, chat, exchange))
            return
        finally:
            self.images.budget.release(held[0])
        self._finished(result, exchange)
        body = schemas.completion_body(
            exchange.request_id, schemas.now(), self.served_model_name, result
        )
        await send_json(send, 200, body)

    async def _stream(
        self, chat: ChatRequest, pending: list[Conversation], exchange: Exchange, send: Send
    ) -> None:
        held = [0]
        try:
            await self._stream_holding(chat, pending, exchange, send, held)
        finally:
            self.images.budget.release(held[0])

    async def _stream_holding(
        self,
        chat: ChatRequest,
        pending: list[Conversation],
        exchange: Exchange,
        send: Send,
        held: list[int],
    ) -> None:
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
            return sse(body)

        stream: Any = None
        try:
            conversation = await self.images.load(pending.pop(), held)
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
            await send_error(send, self._error(exc, chat, exchange))
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
            await body_part(send, event(delta={"role": "assistant", "content": ""}))
            if first:
                await body_part(send, event(delta={"content": first}))
            if first is not None:
                async for piece in stream:
                    if piece:
                        await body_part(send, event(delta={"content": piece}))
            result: Result = stream.result
            self._finished(result, exchange)
            # Log-probabilities, when asked for, come whole with the last chunk: pieces
            # are text, not tokens, so the chunks cannot split them exactly.
            logprobs = schemas.logprobs_body(result)
            await body_part(
                send, event(delta={}, finish_reason=result.finish_reason, logprobs=logprobs)
            )
            if include_usage:
                await body_part(send, event(usage=schemas.usage_body(result)))
        except Exception as exc:
            # The 200 is out: report the failure as an error event, as OpenAI does.
            error = self._error(exc, chat, exchange)
            exchange.note(f"stream error {error.status}")
            await body_part(send, sse(error.body()))
        finally:
            await _close(stream)
        await body_part(send, b"data: [DONE]\n\n", more=False)


# -- helpers (shared with app.py) ---------------------------------------------------------

_JSON = b"application/json"
_NO_CONVERSATION = Conversation()


def model_not_found(name: str) -> APIError:
    """404 for a model this server does not serve."""
    return APIError(
        404,
        f"The model {short_repr(name)} does not exist on this server; GET /v1/models lists the "
        "one it serves.",
        param="model",
        code="model_not_found",
    )


async def send_json(
    send: Send, status: int, body: object, headers: dict[str, str] | None = None
) -> None:
    """A whole JSON response."""
    payload = json.dumps(body, ensure_ascii=False).encode()
    raw = [
        (b"content-type", _JSON),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(send: Send, error: APIError) -> None:
    """``error`` as its OpenAI-shaped JSON response."""
    await send_json(send, error.status, error.body(), error.headers)


async def body_part(send: Send, data: bytes, *, more: bool = True) -> None:
    """One piece of a streamed body."""
    await send({"type": "http.response.body", "body": data, "more_body": more})


def sse(body: object) -> bytes:
    """One server-sent event holding ``body`` as JSON."""
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


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
        try:
            await asyncio.shield(close())
        except Exception:  # closing is best effort: the answer is already decided
            logger.debug("closing a stream failed", exc_info=True)
