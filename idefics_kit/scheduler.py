"""The one worker thread that owns the model: it admits requests into the running batch.

Every call on a :class:`~idefics_kit.Generator`, from any thread or event
loop, becomes one :class:`~idefics_kit.requests.Request` per conversation,
prepared (checked, decoded, encoded) by the caller and put in a bounded
queue. The worker runs the :class:`~idefics_kit.engine.Engine` step by step;
before each step it admits queued requests, first come first served:

- while fewer than ``max_batch_size`` rows run (and fewer than any running
  or admitted batch call's ``batch_size``);
- while the prompts admitted in this step stay within ``max_prefill_tokens``
  (the head of the queue is always admitted when a row is free, so a long
  prompt waits at most for a free row, never for shorter ones behind it):
  this bounds how long an admission's prefill stalls the running rows;
- a request arriving while nothing runs waits at most ``max_wait_ms`` for
  more to fill the first batch, and at most ``ARRIVAL_WAIT_S`` for calls
  whose conversations are still being prepared.

A finished row leaves the batch at the step that finished it and its caller
gets its Result then; a cancelled row leaves at the next step.

Supervision: a prefill that fails is retried in halves until the failing
request is alone, and only that request fails; a decoding step that fails
fails the running rows, with :class:`~idefics_kit.GenerationError`; an
out-of-memory error is retried with half the rows (decoding: the newest half
goes back to the queue and starts over). Any other exception in the worker
fails the requests it concerns and the worker goes on; after
``MAX_CONSECUTIVE_FAILURES`` failing iterations in a row it stops, and every
pending and later call fails at once with
:class:`~idefics_kit.EngineFailedError` (``Generator.ready`` is then False).

Nothing here holds a lock while the model runs: the lock guards the queue,
and each request hands its outcome over exactly once.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch

from idefics_kit import engine, runner
from idefics_kit.errors import (
    EngineFailedError,
    GenerationError,
    GeneratorClosedError,
    InvalidParameterError,
    OverloadedError,
)
from idefics_kit.options import GenerationOptions
from idefics_kit.requests import CANCELLED, Outcome, Request
from idefics_kit.results import Result
from idefics_kit.runner import Prepared

__all__ = [
    "ARRIVAL_WAIT_S",
    "DEFAULT_MAX_PREFILL_TOKENS",
    "MAX_CONSECUTIVE_FAILURES",
    "BatchSize",
    "Outcome",
    "Scheduler",
    "SchedulerStats",
    "batch_limit",
    "check_batch_size",
]

ARRIVAL_WAIT_S = 0.2
"""The longest a first batch waits for calls that arrived but are still being prepared."""

DEFAULT_MAX_PREFILL_TOKENS = 4096
"""Prompt tokens admitted per step while rows run (the head of the queue always fits)."""

MAX_CONSECUTIVE_FAILURES = 3
"""Failing worker iterations in a row after which the worker gives up."""

T = TypeVar("T")
BatchSize = int | Literal["auto"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerStats:
    """What the worker has done so far and what waits for it; export it to metrics.

    ``tokens_per_second`` is generated tokens per second of model time
    (``busy_seconds``), the worker's throughput while it has work.
    """

    queued: int
    """Requests waiting for a row."""
    running: int
    """Rows in the running batch now."""
    batches: int
    """Admission rounds: prefills that started rows (rows that joined at one step count once)."""
    rows: int
    """Rows admitted into the running batch (a row preempted and admitted again counts twice)."""
    completed: int
    """Requests answered (including those whose answer is an error result)."""
    cancelled: int
    """Requests given up by their callers (closed stream, timeout, cancelled task)."""
    generated_tokens: int
    busy_seconds: float
    steps: int = 0
    """Decoding steps run (each decodes one token for every running row)."""
    row_steps: int = 0
    """Rows decoded, summed over those steps."""
    preempted: int = 0
    """Rows sent back to the queue after a decoding step ran out of memory."""

    @property
    def mean_batch_size(self) -> float:
        """Running rows per decoding step (0.0 before the first)."""
        return self.row_steps / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of model time (0.0 before the first step)."""
        return self.generated_tokens / self.busy_seconds if self.busy_seconds else 0.0


class _Call(Generic[T]):
    """A function to run on the worker thread between steps."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.event = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.cancelled = False


class Scheduler:
    """Owns the worker thread and the engine; see the module docstring."""

    def __init__(
        self,
        engine: engine.Engine,
        *,
        max_batch_size: Callable[[Prepared, GenerationOptions], int],
        max_wait_ms: float,
        max_queued: int,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        name: str = "idefics-kit-worker",
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._max_queued = max_queued
        self._max_prefill = max_prefill_tokens
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._calls: deque[_Call[Any]] = deque()
        self._running: dict[int, Request] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failure: EngineFailedError | None = None
        self._alone = False
        self._arriving = 0
        self._steps = 0
        self._rows = 0
        self._completed = 0
        self._cancelled = 0
        self._tokens = 0
        self._busy = 0.0
        self._admitted = 0
        self._rounds = 0
        self._preempted = 0

    # -- callers' side -------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the worker gave up)."""
        return self._closed

    @property
    def failure(self) -> EngineFailedError | None:
        """Why the worker stopped, when it stopped on its own; None otherwise."""
        return self._failure

    def submit(self, requests: Sequence[Request], *, wait_for_room: bool = False) -> None:
        """Queue ``requests``; a full queue raises :class:`OverloadedError` at once.

        With ``wait_for_room`` (batch calls: one caller's bounded backlog) the
        requests go in as room frees up instead, in order. A request cancelled
        while it was prepared is not queued; its outcome is handed over now.
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
                dropped = []
                for request in pending[:room]:
                    if request.enqueue(self._withdraw):
                        self._queue.append(request)
                    else:
                        dropped.append(request)
                pending = pending[room:]
                self._start()
                self._cond.notify_all()
            for request in dropped:
                request.finish(CANCELLED)

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

    def call(
        self, fn: Callable[[], T], *, deadline: float | None = None, on_timeout: Any = None
    ) -> T:
        """Run ``fn`` on the worker thread between steps; its result or error.

        Past ``deadline`` (``time.monotonic()``) the call is dropped if it has
        not started and ``on_timeout`` (an exception) is raised; a started
        call stops at its next check of ``job.cancelled``.
        """
        job: _Call[T] = _Call(fn)
        with self._cond:
            self._check_open()
            self._calls.append(job)
            self._start()
            self._cond.notify_all()
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.event.wait(left):
                raise on_timeout
        except BaseException:
            job.cancelled = True
            raise
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[return-value]

    def stats(self) -> SchedulerStats:
        """Counters now."""
        with self._cond:
            return SchedulerStats(
                queued=len(self._queue),
                running=len(self._running),
                batches=self._rounds,
                rows=self._admitted,
                completed=self._completed,
                cancelled=self._cancelled,
                generated_tokens=self._tokens,
                busy_seconds=self._busy,
                steps=self._steps,
                row_steps=self._rows,
                preempted=self._preempted,
            )

    def close(self) -> None:
        """Stop the worker: queued requests fail, running rows stop after this step.

        Both get :class:`GeneratorClosedError`. Returns once the worker has
        exited (at most one decoding step later). Idempotent.
        """
        self._shut(GeneratorClosedError("the Generator was closed before this ran"))

    def _shut(self, error: GeneratorClosedError | EngineFailedError) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            calls, self._calls = list(self._calls), deque()
            running = list(self._running.values())
            self._cond.notify_all()
            thread = self._thread
        for request in running:
            request.cancel(
                error
                if isinstance(error, EngineFailedError)
                else GeneratorClosedError("the Generator was closed while this ran")
            )
        for request in queued:
            request.finish(error)
        for job in calls:
            job.error = error
            job.event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise GeneratorClosedError("this Generator is closed; load a new one to generate again")

    def _start(self) -> None:
        # Started on first use, so Generators that are never used cost no thread.
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    def _withdraw(self, request: Request) -> None:
        """A queued request was cancelled: out of the queue now, its room free again."""
        with self._cond:
            try:
                self._queue.remove(request)
            except ValueError:
                return  # taken by the worker meanwhile: it leaves the batch at the next step
            self._cancelled += 1
            self._cond.notify_all()
        request.finish(CANCELLED)

    # -- the worker ----------------------------------------------------------------

    def _work(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while (
                    not self._queue
                    and not self._calls
                    and not self._engine.rows
                    and not self._closed
                ):
                    self._cond.wait()
                if self._closed:
                    break
                job = self._calls.popleft() if self._calls else None
            if job is not None:
                _run_call(job)
                continue
            admitted: list[Request] = []
            try:
                with self._cond:
                    if not self._engine.rows:
                        self._wait_for_more()
                    admitted = self._take()
                self._iterate(admitted)
                failures = 0
            except _Handled as handled:
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._give_up(handled.cause)
                    return
            except BaseException as exc:  # supervision: nothing kills the worker silently
                failures += 1
                self._fail_all_running(admitted, exc)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._give_up(exc)
                    return
        self._stop_rows()

    def _iterate(self, admitted: list[Request]) -> None:
        started = time.perf_counter()
        if admitted:
            self._admit(admitted)
            self._evict()  # rows done at their first token leave before the step
        rows = len(self._engine.rows)
        if rows:
            try:
                self._engine.step()
            except torch.OutOfMemoryError:
                self._after_decode_oom()
                rows = 0
            except GenerationError as exc:
                for row in self._engine.clear():
                    self._finish_row(row, Result.failed(_fresh(exc)))
                rows = 0
        self._evict()
        elapsed = time.perf_counter() - started
        with self._cond:
            self._busy += elapsed
            if rows:
                self._steps += 1
                self._rows += rows

    def _wait_for_more(self) -> None:
        """Nothing runs: let the first batch fill (arrivals being prepared, ``max_wait_ms``)."""
        if not self._queue:
            return
        limit = self._limit()
        if limit is None:
            return
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

    def _limit(self) -> int | None:
        """``max_batch_size`` for the queue's head (under the lock); None if it could not say.

        The "auto" probe asks the device for free memory, which raises after
        a device error: the request it was asked for fails, the worker goes on.
        """
        while self._queue:
            head = self._queue[0]
            assert head.item is not None
            try:
                return self._max_batch_size(head.item, head.options)
            except Exception as exc:
                self._queue.popleft()
                error = GenerationError(f"the model's worker failed: {type(exc).__name__}: {exc}")
                self._completed += 1
                # Safe under the lock: outcome hooks never take it.
                head.finish(Result.failed(error))
                raise _Handled(exc) from None
        return None

    def _take(self) -> list[Request]:
        """Requests to admit now, in queue order (first come, first served)."""
        if not self._queue or self._alone:
            return []
        limit = self._limit()
        if limit is None:
            return []
        for request in self._running.values():
            if request.cap is not None:
                limit = min(limit, request.cap)
        running = len(self._engine.rows)
        columns = self._engine.columns
        budget = self._max_prefill if running else None
        taken: list[Request] = []
        spent = 0
        while self._queue and running + len(taken) < limit:
            request = self._queue[0]
            assert request.item is not None
            length = request.item.length
            if taken and budget is not None and spent + length > budget:
                break
            if request.cap is not None and running + len(taken) >= request.cap:
                break
            total = max(columns, length) + request.options.max_new_tokens
            if not self._engine.joinable(total):
                # A sliding window shorter than this row: it runs alone.
                if running or taken:
                    break
                self._queue.popleft()
                taken.append(request)
                self._alone = True
                break
            self._queue.popleft()
            taken.append(request)
            spent += length
            if request.cap is not None:
                limit = min(limit, request.cap)
        if taken:
            self._cond.notify_all()  # room for callers waiting to submit
        return taken

    def _admit(self, requests: list[Request]) -> None:
        live = [r for r in requests if r.start()]
        for request in requests:
            if request.stage != "running":
                self._count_cancelled()
                request.finish(CANCELLED)
        if not live:
            return
        with self._cond:
            for request in live:
                self._running[id(request)] = request
            self._admitted += len(live)
            self._rounds += 1
        self._admit_rows(live)

    def _admit_rows(self, requests: list[Request]) -> None:
        """Prefill and join; a failing prefill is bisected so that only failing rows fail."""
        rows = [self._row(request) for request in requests]
        items = [request.item for request in requests]
        failure: BaseException | None = None
        try:
            self._engine.admit(items, rows)
        except torch.OutOfMemoryError as exc:
            failure = _fresh(exc)
        except GenerationError as exc:
            failure = exc
        else:
            for request in requests:
                request.prefilled()
            return
        # Out of the except block: its traceback no longer keeps the failed
        # attempt's tensors alive while the halves run.
        _release_memory()
        if len(requests) > 1:
            half = len(requests) // 2
            self._admit_rows(requests[:half])
            self._admit_rows(requests[half:])
            return
        request = requests[0]
        if isinstance(failure, torch.OutOfMemoryError):
            if self._engine.rows:
                # It may fit once the running rows are done: back to the queue head, alone.
                self._back_to_queue([request])
                with self._cond:
                    self._alone = True
                return
            error = GenerationError(f"out of memory even for this conversation alone: {failure}")
            error.__cause__ = failure  # traceback-free: it keeps no tensors alive
            failure = error
        self._finish_request(request, Result.failed(_as_generation_error(failure)))

    def _row(self, request: Request) -> engine.Row:
        return engine.Row(
            options=request.options,
            on_token=request.token if request.on_token is not None else None,
            cancelled=request.is_cancelled,
            owner=request,
            seed=request.seed,
            skip=request.delivered,
        )

    def _after_decode_oom(self) -> None:
        """A decoding step ran out of memory: the newest half of the rows goes back to the queue."""
        _release_memory()
        rows = len(self._engine.rows)
        if rows <= 1:
            for row in self._engine.clear():
                error = GenerationError("out of memory even for this conversation alone")
                self._finish_row(row, Result.failed(error))
            return
        taken = self._engine.preempt(rows // 2)
        requests = []
        for row in taken:
            request = row.owner
            assert isinstance(request, Request)
            request.seed = row.seed
            requests.append(request)
        with self._cond:
            self._preempted += len(requests)
        self._back_to_queue(requests)
        _release_memory()

    def _back_to_queue(self, requests: list[Request]) -> None:
        with self._cond:
            for request in reversed(requests):
                self._running.pop(id(request), None)
                if request.requeue(self._withdraw):
                    self._queue.appendleft(request)
            self._cond.notify_all()

    def _evict(self) -> None:
        for row in self._engine.evict():
            request = row.owner
            assert isinstance(request, Request)
            if request.cancelled:
                self._count_cancelled()
                with self._cond:
                    self._running.pop(id(request), None)
                request.finish(CANCELLED)
                continue
            self._finish_row(row, self._engine.result(row))
        if not self._engine.rows and self._alone:
            with self._cond:
                self._alone = False

    def _finish_row(self, row: engine.Row, outcome: Outcome) -> None:
        request = row.owner
        assert isinstance(request, Request)
        self._finish_request(request, outcome)

    def _finish_request(self, request: Request, outcome: Outcome) -> None:
        with self._cond:
            self._running.pop(id(request), None)
            if request.cancelled:
                self._cancelled += 1
            else:
                self._completed += 1
                if isinstance(outcome, Result):
                    self._tokens += outcome.usage.completion_tokens
        request.finish(outcome)

    def _count_cancelled(self) -> None:
        with self._cond:
            self._cancelled += 1

    def _fail_all_running(self, admitted: list[Request], exc: BaseException) -> None:
        """An unexpected exception: fail the rows it concerns (admitted and running) and reset."""
        error = GenerationError(
            f"the model's worker failed: {type(exc).__name__}: {exc}"
        ).with_traceback(None)
        concerned = {id(r): r for r in admitted}
        with contextlib.suppress(BaseException):
            for row in self._engine.clear():
                if isinstance(row.owner, Request):
                    concerned[id(row.owner)] = row.owner
        with self._cond:
            concerned.update(self._running)
        for request in concerned.values():
            self._finish_request(request, Result.failed(_fresh(error)))
        del exc

    def _give_up(self, exc: BaseException) -> None:
        failure = EngineFailedError(
            f"the model's worker stopped after {MAX_CONSECUTIVE_FAILURES} failures in a row "
            f"(last: {type(exc).__name__}: {exc}); load a new Generator"
        )
        with self._cond:
            self._failure = failure
            self._thread = threading.current_thread()
        self._shut(failure)

    def _stop_rows(self) -> None:
        """Closed: the rows still running stop now with their cancel reason."""
        for row in self._engine.clear():
            request = row.owner
            assert isinstance(request, Request)
            self._finish_request(request, GeneratorClosedError("the Generator was closed"))


class _Handled(Exception):
    """A worker failure whose requests were already failed: count it, fail nothing more."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _run_call(job: _Call[Any]) -> None:
    try:
        if not job.cancelled:
            job.value = job.fn()
    except BaseException as exc:
        job.error = exc.with_traceback(None)
    finally:
        job.event.set()


def _fresh(exc: BaseException) -> Any:
    """``exc`` without its traceback: a kept error must not keep the failed step's tensors alive."""
    exc.__traceback__ = None
    exc.__context__ = None
    return exc


def _as_generation_error(exc: BaseException) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    return GenerationError(f"{type(exc).__name__}: {exc}").with_traceback(None)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_batch_size(name: str, batch_size: object) -> None:
    """``max_batch_size`` / ``batch_size``: an int >= 1 or ``"auto"``."""
    if batch_size == "auto":
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(
            name, f"{name} must be an int >= 1 or 'auto', got {batch_size!r}", batch_size
        )


def batch_limit(model: Any, setting: BatchSize) -> Callable[[Prepared, GenerationOptions], int]:
    """Running rows allowed when a given request is next in line (it holds no Generator)."""

    def limit(head: Prepared, options: GenerationOptions) -> int:
        if setting != "auto":
            return setting
        if model.device.type != "cuda":
            return runner.CPU_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(model.device)
        # Batch calls queue their longest rows first, so the head is the longest.
        return runner.estimate_batch_size(
            model.config.get_text_config(),
            model.dtype,
            head.length + options.max_new_tokens,
            free,
        )

    return limit
