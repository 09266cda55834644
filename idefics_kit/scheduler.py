"""The one worker thread that owns the model, and the requests it serves.

Every call on a :class:`~idefics_kit.Generator`, from any thread or event
loop, becomes one :class:`Request` per conversation, prepared (checked,
decoded, encoded) by the caller and put in a bounded queue. The worker takes
what is queued, at most ``max_batch_size`` rows of one encoding group (same
model input keys), and runs them as one micro-batch; each row keeps its own
options, hooks and cancellation (:mod:`idefics_kit.engine`). With
``max_wait_ms`` > 0 it waits that long for more rows when fewer than
``max_batch_size`` are queued; by default it never waits for requests that
have not arrived. A call whose conversation is still being prepared in its
caller's thread has arrived, though: the worker waits for those (at most
``ARRIVAL_WAIT_S``), so that callers who asked together share a batch even
when their images take a few milliseconds more to decode.

Nothing here holds a lock while the model runs or while a caller consumes a
stream: the lock only guards the queue, and each request hands its outcome
over exactly once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from idefics_kit import engine
from idefics_kit.errors import GeneratorClosedError, OverloadedError
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result
from idefics_kit.runner import Prepared, Runner

__all__ = ["ARRIVAL_WAIT_S", "Outcome", "Request", "Scheduler", "SchedulerStats"]

ARRIVAL_WAIT_S = 0.2
"""The longest a batch waits for calls that arrived but are still being prepared."""

Outcome = Result | BaseException
"""What a request ends with: its Result, or the exception its caller should raise."""

T = TypeVar("T")

_CANCELLED = RuntimeError("cancelled by its caller")
"""The outcome of a request its caller gave up on (nobody reads it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerStats:
    """What the worker has done so far and what waits for it; export it to metrics.

    ``tokens_per_second`` is generated tokens per second of model time
    (``busy_seconds``), the worker's throughput while it has work.
    """

    queued: int
    """Rows waiting for the worker."""
    running: int
    """Rows in the micro-batch the model is running now."""
    batches: int
    """Micro-batches run (a micro-batch split after running out of memory counts once)."""
    rows: int
    """Rows run in those micro-batches."""
    completed: int
    """Requests answered (including those whose answer is an error result)."""
    cancelled: int
    """Requests given up by their callers (closed stream, timeout, cancelled task)."""
    generated_tokens: int
    busy_seconds: float

    @property
    def mean_batch_size(self) -> float:
        """Rows per micro-batch (0.0 before the first)."""
        return self.rows / self.batches if self.batches else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of model time (0.0 before the first batch)."""
        return self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0


class Request:
    """One conversation on its way through the worker.

    ``on_done`` is called exactly once, from the worker thread (or from
    ``close()``), with the outcome. ``cancel()`` may be called from any
    thread: a queued request is dropped, a running row stops after the
    current decoding step.
    """

    __slots__ = ("_done", "cancelled", "cap", "item", "on_done", "on_token", "options", "reason")

    def __init__(
        self,
        item: Prepared,
        options: GenerationOptions,
        on_done: Callable[[Outcome], None],
        *,
        cap: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> None:
        self.item = item
        self.options = options
        self.on_done = on_done
        self.cap = cap
        self.on_token = on_token
        self.cancelled = False
        self.reason: BaseException | None = None
        self._done = False

    def cancel(self, reason: BaseException | None = None) -> None:
        """Give up on this request; ``reason`` replaces its outcome when given."""
        if reason is not None and self.reason is None:
            self.reason = reason
        self.cancelled = True

    def finish(self, outcome: Outcome) -> None:
        """Hand the outcome over (once; later calls are ignored)."""
        if self._done:
            return
        self._done = True
        self.on_done(self.reason if self.reason is not None else outcome)

    def row(self) -> engine.Row:
        """This request as a row of a micro-batch."""
        return engine.Row(
            options=self.options, on_token=self.on_token, cancelled=self._is_cancelled
        )

    def _is_cancelled(self) -> bool:
        return self.cancelled


class _Call(Generic[T]):
    """A function to run on the worker thread between micro-batches."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.event = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class Scheduler:
    """Owns the worker thread; see the module docstring."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch_size: Callable[[Prepared, GenerationOptions], int],
        max_wait_ms: float,
        max_queued: int,
        name: str = "idefics-kit-worker",
    ) -> None:
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._max_queued = max_queued
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._calls: deque[_Call[Any]] = deque()
        self._running: list[Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._arriving = 0
        self._batches = 0
        self._rows = 0
        self._completed = 0
        self._cancelled = 0
        self._tokens = 0
        self._busy = 0.0

    # -- callers' side -------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def submit(self, requests: Sequence[Request], *, wait_for_room: bool = False) -> None:
        """Queue ``requests``; a full queue raises :class:`OverloadedError` at once.

        With ``wait_for_room`` (batch calls: one caller's bounded backlog) the
        requests go in as room frees up instead, in order.
        """
        pending = list(requests)
        while pending:
            with self._cond:
                self._check_open()
                room = self._max_queued - len(self._queue)
                if not wait_for_room and len(pending) > room:
                    raise OverloadedError(
                        f"the request queue is full ({len(self._queue)} of max_queued="
                        f"{self._max_queued} rows waiting; this call needs {len(pending)}): "
                        "retry later, or raise max_queued"
                    )
                if room <= 0:
                    self._cond.wait(timeout=0.05)
                    continue
                self._queue.extend(pending[:room])
                pending = pending[room:]
                self._start()
                self._cond.notify_all()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a call's preparation and submission: it counts as arrived meanwhile."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread between micro-batches; its result or error."""
        job: _Call[T] = _Call(fn)
        with self._cond:
            self._check_open()
            self._calls.append(job)
            self._start()
            self._cond.notify_all()
        job.event.wait()
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]

    def stats(self) -> SchedulerStats:
        """Counters now."""
        with self._cond:
            return SchedulerStats(
                queued=len(self._queue),
                running=len(self._running),
                batches=self._batches,
                rows=self._rows,
                completed=self._completed,
                cancelled=self._cancelled,
                generated_tokens=self._tokens,
                busy_seconds=self._busy,
            )

    def close(self) -> None:
        """Stop the worker: queued requests fail, running rows stop after this step.

        Both get :class:`GeneratorClosedError`. Returns once the worker has
        exited (at most one decoding step later). Idempotent.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            calls, self._calls = list(self._calls), deque()
            for request in self._running:
                request.cancel(GeneratorClosedError("the Generator was closed while this ran"))
            self._cond.notify_all()
            thread = self._thread
        for request in queued:
            request.finish(GeneratorClosedError("the Generator was closed before this ran"))
        for job in calls:
            job.error = GeneratorClosedError("the Generator was closed before this ran")
            job.event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _check_open(self) -> None:
        if self._closed:
            raise GeneratorClosedError("this Generator is closed; load a new one to generate again")

    def _start(self) -> None:
        # Started on first use, so Generators that are never used cost no thread.
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    # -- the worker ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if self._calls:
                    job: _Call[Any] | None = self._calls.popleft()
                    batch: list[Request] = []
                else:
                    job = None
                    self._wait_for_more()
                    batch = self._take()
                    self._running = batch
            if job is not None:
                _run_call(job)
            elif batch:
                self._run(batch)

    def _wait_for_more(self) -> None:
        head = self._queue[0]
        limit = self._max_batch_size(head.item, head.options)
        now = time.monotonic()
        arrivals = now + ARRIVAL_WAIT_S
        more = now + self._max_wait
        while not self._closed and len(self._queue) < limit:
            now = time.monotonic()
            if self._arriving and now < arrivals:
                self._cond.wait(timeout=arrivals - now)
            elif now < more:
                self._cond.wait(timeout=more - now)
            else:
                return

    def _take(self) -> list[Request]:
        """The oldest request and as many queued ones of its group as fit, in queue order."""
        live: deque[Request] = deque()
        for request in self._queue:
            if request.cancelled:
                self._cancelled += 1
                request.finish(request.reason or _CANCELLED)
            else:
                live.append(request)
        self._queue = live
        if not live:
            return []
        head = live[0]
        limit = self._max_batch_size(head.item, head.options)
        if head.cap is not None:
            limit = min(limit, head.cap)
        taken: list[Request] = []
        rest: deque[Request] = deque()
        for request in live:
            fits = len(taken) < limit and (request.cap is None or len(taken) < request.cap)
            if fits and request.item.group == head.item.group:
                taken.append(request)
                if request.cap is not None:
                    limit = min(limit, request.cap)
            else:
                rest.append(request)
        self._queue = rest
        self._cond.notify_all()  # room for callers waiting to submit
        return taken

    def _run(self, batch: list[Request]) -> None:
        started = time.perf_counter()
        try:
            outcomes: list[Outcome] = list(
                self._runner.run([r.item for r in batch], [r.row() for r in batch])
            )
        except BaseException as exc:  # handed to each caller, raised there
            outcomes = [exc] * len(batch)
        elapsed = time.perf_counter() - started
        with self._cond:
            self._running = []
            self._batches += 1
            self._rows += len(batch)
            self._busy += elapsed
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.cancelled:
                    self._cancelled += 1
                else:
                    self._completed += 1
                if isinstance(outcome, Result) and not request.cancelled:
                    self._tokens += outcome.usage.completion_tokens
        for request, outcome in zip(batch, outcomes, strict=True):
            request.finish(outcome)


def _run_call(job: _Call[Any]) -> None:
    try:
        job.value = job.fn()
    except BaseException as exc:
        job.error = exc
    finally:
        job.event.set()
