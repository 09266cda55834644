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

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result

if TYPE_CHECKING:
    from idefics_kit.runner import Prepared

__all__ = ["CANCELLED", "Outcome", "Request", "Stage"]

Outcome = Result | BaseException
"""What a request ends with: its Result, or the exception its caller should raise."""

Stage = Literal["preparing", "queued", "running", "done"]

CANCELLED = RuntimeError("cancelled by its caller")
"""The outcome of a request its caller gave up on without a reason (nobody reads it)."""


class Request:
    """One conversation on its way to an answer; see the module docstring."""

    __slots__ = (
        "_lock",
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
        self.on_done(outcome)

    def enqueue(self, withdraw: Callable[[Request], None]) -> bool:
        """Mark it queued (the scheduler calls this under its lock); False if it was cancelled."""
        with self._lock:
            if self.cancelled or self.stage != "preparing":
                return False
            self.stage = "queued"
            self._withdraw = withdraw
            return True

    def start(self) -> bool:
        """Mark it running (taken from the queue into the batch); False if it is over."""
        with self._lock:
            if self.cancelled or self.stage == "done":
                return False
            self.stage = "running"
            self._withdraw = None
            return True

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
