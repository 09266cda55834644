"""Streams of answer text: :class:`TextStream` (iterate) and :class:`AsyncTextStream` (async for).

The worker hands each stream the token ids of its own row as the decoding
steps produce them; the stream decodes them in the consumer's thread (or
event loop), so a slow consumer never slows the batch, and closing a stream
only stops its own row.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any

from idefics_kit.detokenize import TextDecoder
from idefics_kit.options import GenerationOptions
from idefics_kit.requests import Outcome, Request, timeout_error
from idefics_kit.results import Result

__all__ = ["AsyncTextStream", "TextStream"]


class _Final:
    __slots__ = ("outcome",)

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


class _Pieces:
    """Turns a row's tokens and final outcome into text pieces (shared by both streams)."""

    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder
        self.result: Result | None = None
        self.done = False

    def take(self, item: object) -> str | None:
        """The text to yield for ``item`` ("" for nothing yet); None at the end."""
        if isinstance(item, int):
            return self.decoder.feed((item,))
        assert isinstance(item, _Final)
        self.done = True
        outcome = item.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome.error is not None:
            raise outcome.error
        self.result = outcome
        return self.decoder.rest(outcome.text) or None


class TextStream:
    """The answer to one conversation, in text pieces as soon as they are final.

    Iterate it; ``"".join(stream)`` equals ``generate(...).text``. Once it is
    exhausted, :attr:`result` holds the full :class:`Result` (finish reason,
    token ids, usage). :meth:`close` (or leaving a ``with`` block, or
    dropping the stream) stops its row after the current decoding step;
    other rows of the batch are not affected.
    """

    def __init__(
        self, decoder: TextDecoder, options: GenerationOptions, timeout: float | None
    ) -> None:
        self._pieces = _Pieces(decoder)
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        sink: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._queue = sink

        # The hooks hold the queue, not the stream: a stream its caller
        # dropped is collected, and its ``__del__`` stops the row.
        def on_done(outcome: Outcome) -> None:
            sink.put(_Final(outcome))

        self.request = Request(options, on_done, on_token=sink.put)
        """This stream's request handle (queue it with the Generator that made the stream)."""

    @property
    def result(self) -> Result | None:
        """The full Result once the stream is exhausted; None before."""
        return self._pieces.result

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            while not self._pieces.done:
                piece = self._pieces.take(self._get())
                if piece is None:
                    break
                if piece:
                    return piece
        except BaseException:
            self.close()
            raise
        raise StopIteration

    def _get(self) -> object:
        if self._deadline is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            raise timeout_error(self._timeout) from None

    def close(self) -> None:
        """Stop this stream's request at any stage (no effect once the stream is exhausted)."""
        self._pieces.done = True
        self.request.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.request.cancel()


class AsyncTextStream:
    """:class:`TextStream` for ``async for``; the event loop is never blocked.

    The conversation is prepared (images decoded, prompt encoded) in a worker
    thread when iteration starts, so input errors are raised by the first
    ``__anext__``. Cancelling the task that iterates, or ``await
    stream.aclose()``, stops the row after the current decoding step.
    """

    def __init__(
        self,
        decoder: TextDecoder,
        options: GenerationOptions,
        timeout: float | None,
        submit: Callable[[Request], Awaitable[None]],
    ) -> None:
        self._pieces = _Pieces(decoder)
        self._timeout = timeout
        self._submit: Callable[[Request], Awaitable[None]] | None = submit
        self._sink = _LoopSink()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: float | None = None
        self.request = Request(options, self._sink.done, on_token=self._sink.post)
        """This stream's request handle; it is queued when iteration starts."""

    @property
    def result(self) -> Result | None:
        """The full Result once the stream is exhausted; None before."""
        return self._pieces.result

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        try:
            if self._submit is not None:
                submit, self._submit = self._submit, None
                self._loop = asyncio.get_running_loop()
                self._sink.listen(self._loop)
                if self._timeout is not None:
                    self._deadline = self._loop.time() + self._timeout
                await self._with_deadline(submit(self.request))
            while not self._pieces.done:
                assert self._sink.queue is not None
                piece = self._pieces.take(await self._with_deadline(self._sink.queue.get()))
                if piece is None:
                    break
                if piece:
                    return piece
        except BaseException:
            self._cancel()
            raise
        raise StopAsyncIteration

    async def _with_deadline(self, awaitable: Awaitable[Any]) -> Any:
        if self._deadline is None:
            return await awaitable
        assert self._loop is not None
        try:
            return await asyncio.wait_for(awaitable, max(0.0, self._deadline - self._loop.time()))
        except asyncio.TimeoutError:
            raise timeout_error(self._timeout) from None

    def _cancel(self) -> None:
        self._pieces.done = True
        self._submit = None
        self.request.cancel()

    async def aclose(self) -> None:
        """Stop this stream's request at any stage (no effect once the stream is exhausted)."""
        self._cancel()

    def __del__(self) -> None:
        self.request.cancel()


class _LoopSink:
    """Hands a request's tokens and outcome to an event loop's queue, from any thread.

    It holds the loop and the queue, not the stream (see :class:`TextStream`).
    """

    __slots__ = ("loop", "queue")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[object] | None = None

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue = asyncio.Queue()

    def post(self, item: object) -> None:
        # From the worker thread; a closed loop means nobody listens any more.
        loop, sink = self.loop, self.queue
        if loop is None or sink is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(sink.put_nowait, item)

    def done(self, outcome: Outcome) -> None:
        self.post(_Final(outcome))
