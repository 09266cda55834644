"""A caller's request: one conversation's handle from the moment of the call to its outcome.

A :class:`Request` exists before its images are loaded or its prompt
encoded, so it can be cancelled, time out or be closed in every stage:

``"preparing"``  the caller's thread (or an executor thread) checks, decodes
                 and encodes the conversation; a request cancelled now is
                 never queued.
``"queued"``     waiting for a row in the running batch; cancelling it takes
                 it out of the queue at once (its ``max_queued`` room is free
                 again) and hands over its outcome.
``"running"``    a row of the running batch; cancelling it frees the row at
                 the next decoding step.
``"done"``       the outcome was handed over (exactly once).

Its outcome goes to ``on_done``: a :class:`~idefics_kit.Result`, or the
exception the caller should raise. Streams also get ``on_token`` for each
generated token id. Both are called from the model's worker thread (or from
the thread that cancelled or closed), never under a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from idefics_kit.errors import InvalidParameterError, RequestTimeoutError
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result, Timing

if TYPE_CHECKING:
    from idefics_kit.runner import Prepared

__all__ = [
    "CANCELLED",
    "Outcome",
    "Request",
    "Stage",
    "Waiter",
    "deadline",
    "future_outcome",
    "settled",
    "timeout_error",
    "within",
]

T = TypeVar("T")

Outcome = Result | BaseException
"""What a request ends with: its Result, or the exception its caller should raise."""

Stage = Literal["preparing", "queued", "running", "done"]

CANCELLED = RuntimeError("cancelled by its caller")
"""The outcome of a request its caller gave up on without a reason (nobody reads it)."""


class Request:
    """One conversation on its way to an answer; see the module docstring."""

    __slots__ = (
        "_admitted_at",
        "_first_token_at",
        "_lock",
        "_made_at",
        "_queued_at",
        "_withdraw",
        "cancelled",
        "cap",
        "delivered",
        "item",
        "on_done",
        "on_token",
        "options",
        "reason",
        "seed",
        "stage",
    )

    def __init__(
        self,
        options: GenerationOptions,
        on_done: Callable[[Outcome], None],
        *,
        cap: int | None = None,
        on_token: Callable[[int], None] | None = None,
        item: Prepared | None = None,
    ) -> None:
        self.options = options
        self.on_done = on_done
        self.on_token = on_token
        self.cap = cap
        """At most this many rows may share the batch while this one runs (a batch call's ``batch_size``)."""
        self.item = item
        self.stage: Stage = "preparing"
        self.cancelled = False
        self.reason: BaseException | None = None
        self.seed: int | None = None
        """A sampled row's seed when its options have none (drawn once, kept across restarts)."""
        self.delivered = 0
        """Tokens already handed to ``on_token`` (a restarted row does not repeat them)."""
        self._lock = threading.Lock()
        self._withdraw: Callable[[Request], None] | None = None
        # Monotonic times of its stages, for Result.timing.
        self._made_at = time.monotonic()
        self._queued_at: float | None = None
        self._admitted_at: float | None = None
        self._first_token_at: float | None = None

    def cancel(self, reason: BaseException | None = None) -> None:
        """Give up on this request, from any thread; ``reason`` becomes its outcome when given.

        Preparing: it will not be queued. Queued: it leaves the queue now.
        Running: its row stops at the next step. Done: no effect.
        """
        with self._lock:
            if self.stage == "done":
                return
            if reason is not None and self.reason is None:
                self.reason = reason
            self.cancelled = True
            withdraw = self._withdraw if self.stage == "queued" else None
        if withdraw is not None:
            withdraw(self)

    def finish(self, outcome: Outcome) -> None:
        """Hand the outcome over (once; later calls are ignored)."""
        with self._lock:
            if self.stage == "done":
                return
            self.stage = "done"
            self._withdraw = None
        if self.reason is not None:
            outcome = self.reason
        elif self.cancelled and isinstance(outcome, Result):
            outcome = CANCELLED
        elif isinstance(outcome, Result) and outcome.ok:
            timing = self.timing()
            if timing is not None:
                outcome = dataclasses.replace(outcome, timing=timing)
        self.on_done(outcome)

    def timing(self) -> Timing | None:
        """Where its time went so far (None before its first token)."""
        queued, admitted, first = self._queued_at, self._admitted_at, self._first_token_at
        if queued is None or admitted is None or first is None:
            return None
        made = self._made_at
        return Timing(
            prepare_s=queued - made,
            queue_s=max(0.0, admitted - queued),
            first_token_s=first - made,
            total_s=time.monotonic() - made,
        )

    def enqueue(self, withdraw: Callable[[Request], None]) -> bool:
        """Mark it queued (the scheduler calls this under its lock); False if it was cancelled."""
        with self._lock:
            if self.cancelled or self.stage != "preparing":
                return False
            self.stage = "queued"
            self._withdraw = withdraw
            self._queued_at = time.monotonic()
            return True

    def start(self) -> bool:
        """Mark it running (taken from the queue into the batch); False if it is over."""
        with self._lock:
            if self.cancelled or self.stage == "done":
                return False
            self.stage = "running"
            self._withdraw = None
            self._admitted_at = time.monotonic()
            self._first_token_at = None
            return True

    def prefilled(self) -> None:
        """Its first token was chosen (the worker calls this when its admission is done)."""
        if self._first_token_at is None:
            self._first_token_at = time.monotonic()

    def requeue(self, withdraw: Callable[[Request], None]) -> bool:
        """Back to the queue after a preemption (the scheduler calls this under its lock)."""
        with self._lock:
            if self.cancelled or self.stage != "running":
                return False
            self.stage = "queued"
            self._withdraw = withdraw
            return True

    def token(self, token_id: int) -> None:
        """Hand one generated token to the stream, if any."""
        self.delivered += 1
        if self.on_token is not None:
            self.on_token(token_id)

    def is_cancelled(self) -> bool:
        return self.cancelled


# -- waiting for a request's outcome ---------------------------------------------


def deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidParameterError(
            "timeout", f"timeout must be None or a number of seconds > 0, got {timeout!r}", timeout
        )
    if not math.isfinite(timeout):
        return None
    return time.monotonic() + timeout


def timeout_error(timeout: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"no complete answer within timeout={timeout}s; the request was cancelled "
        "(raise timeout, or lower max_new_tokens)"
    )


class Waiter:
    """Receives one request's outcome in the worker thread; the caller waits for it."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcome: Outcome | None = None

    def __call__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.event.set()

    def wait(self, request: Request, deadline: float | None, timeout: float | None) -> Result:
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.event.wait(left):
                raise timeout_error(timeout)
        except BaseException:
            # Timeout, KeyboardInterrupt ...: only this caller's row stops.
            request.cancel()
            raise
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome


def future_outcome() -> tuple[asyncio.Future[Outcome], Callable[[Outcome], None]]:
    """A future of the running loop, and a thread-safe function that settles it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Outcome] = loop.create_future()

    def set_outcome(outcome: Outcome) -> None:
        if not future.done():
            future.set_result(outcome)

    def settle(outcome: Outcome) -> None:
        # A closed loop raises RuntimeError: nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(set_outcome, outcome)

    return future, settle


async def settled(future: asyncio.Future[Outcome], request: Request) -> Result:
    try:
        outcome = await future
    except BaseException:
        request.cancel()  # the awaiting task was cancelled: free the row
        raise
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


async def within(awaitable: abc.Coroutine[Any, Any, T], timeout: float | None) -> T:
    if timeout is None or not math.isfinite(timeout):
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise timeout_error(timeout) from None
