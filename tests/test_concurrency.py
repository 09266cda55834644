"""Many callers, one model: shared micro-batches, per-row guarantees, asyncio, lifecycle.

The worker is held (a function run on it blocks until released) while
requests queue up, so that which requests share a micro-batch is decided by
the test, not by thread timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from idefics_kit import (
    Conversation,
    GenerationError,
    GenerationOptions,
    Generator,
    GeneratorClosedError,
    OverloadedError,
    RequestTimeoutError,
    Result,
    UsageError,
    engine,
)
from tests.conftest import picture

IMG_A = picture(40, 30, seed=11)
IMG_B = picture(32, 48, seed=12)
SHORT = Conversation().user(IMG_A, "Hi")
LONG = Conversation().user(IMG_A, "Describe this picture in many words, please, all of it.")
TWO = Conversation().user(IMG_A, "Compare", IMG_B, "with this one.")
TEXT = Conversation().user("Tell me a story about a dog.")

MIXED: list[tuple[Conversation, dict[str, Any]]] = [
    (SHORT, {"max_new_tokens": 3}),
    (LONG, {"max_new_tokens": 12}),
    (TWO, {"max_new_tokens": 9, "temperature": 0.9, "top_p": 0.8, "seed": 3}),
    (SHORT, {"max_new_tokens": 10, "repetition_penalty": 1.4}),
    (LONG, {"max_new_tokens": 8, "temperature": 1.2, "top_k": 5, "seed": 7}),
    (TWO, {"max_new_tokens": 11, "stop": ["e", "a"]}),
]


def fresh(gen: Generator, **settings: Any) -> Generator:
    """A Generator of its own (own worker and queue) over the same loaded model."""
    return Generator.from_model(gen.model, gen.processor, **settings)


@contextlib.contextmanager
def held(gen: Generator) -> Iterator[None]:
    """Keep the worker busy until the block ends; requests queue meanwhile."""
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(60)

    holder = threading.Thread(target=gen._scheduler.call, args=(block,))
    holder.start()
    assert started.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join(30)


def wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def answered_together(
    gen: Generator, cases: list[tuple[Conversation, dict[str, Any]]]
) -> list[Result]:
    """Each case asked from its own thread, all queued before the worker takes any."""
    with held(gen):
        started = [
            in_thread(lambda c=conv, o=options: gen.generate(c, **o)) for conv, options in cases
        ]
        wait_until(lambda: gen.stats().queued == len(cases))
    for thread, _ in started:
        thread.join(60)
    return [box["value"] for _, box in started]


def test_rows_with_different_options_share_a_batch_and_match_lone_calls(gen: Generator) -> None:
    lone = [gen.generate(conv, **options) for conv, options in MIXED]
    shared = fresh(gen, max_batch_size=8)
    assert answered_together(shared, MIXED) == lone
    stats = shared.stats()
    # One group (image conversations) within max_batch_size: one micro-batch.
    assert (stats.batches, stats.rows) == (1, len(MIXED))  # the holding call is no batch
    shared.close()


def test_stream_rows_in_a_shared_batch(gen: Generator) -> None:
    lone = [gen.generate(conv, **options) for conv, options in MIXED]
    shared = fresh(gen)
    with held(shared):
        streams = [shared.stream(conv, **options) for conv, options in MIXED]
        wait_until(lambda: shared.stats().queued == len(MIXED))
    for stream, expected in zip(streams, lone, strict=True):
        assert "".join(stream) == expected.text
        assert stream.result == expected
    shared.close()


def test_32_threads_mixing_calls_get_their_lone_results(generators: dict[str, Generator]) -> None:
    base = generators["idefics2"]
    lone = [base.generate(conv, **options) for conv, options in MIXED]
    gen = fresh(base, max_batch_size=6, max_wait_ms=5)
    failures: list[str] = []

    def caller(number: int) -> None:
        kind = number % 3
        pick = [(number + k) % len(MIXED) for k in range(3)]
        if kind == 0:
            got = [gen.generate(MIXED[i][0], **MIXED[i][1]) for i in pick]
        elif kind == 1:
            got = []
            for i in pick:
                stream = gen.stream(MIXED[i][0], **MIXED[i][1])
                text = "".join(stream)
                assert stream.result is not None
                assert text == stream.result.text
                got.append(stream.result)
        else:
            # A batch call takes one options value: group by options.
            got = [
                gen.generate_batch([MIXED[i][0]], GenerationOptions(**MIXED[i][1]))[0] for i in pick
            ]
        if got != [lone[i] for i in pick]:
            failures.append(f"caller {number} ({kind}): {got} != {[lone[i] for i in pick]}")

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert failures == []
    stats = gen.stats()
    assert stats.completed == 96
    assert stats.mean_batch_size > 1.5, stats  # callers really shared batches
    assert stats.queued == stats.running == 0
    gen.close()


def test_closing_a_stream_stops_its_row_and_leaves_the_others(
    generators: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = generators["idefics2"]
    lone = base.generate(LONG, max_new_tokens=150)
    assert lone.usage.completion_tokens >= 100, "needs a row that runs long on its own"
    others = [base.generate(SHORT, max_new_tokens=30), base.generate(TWO, max_new_tokens=30)]
    gen = fresh(base)
    with held(gen):
        stream = gen.stream(LONG, max_new_tokens=150)
        started = [
            in_thread(lambda c=conv: gen.generate(c, max_new_tokens=30)) for conv in (SHORT, TWO)
        ]
        wait_until(lambda: gen.stats().queued == 3)
    next(stream)
    stream.close()
    for thread, _ in started:
        thread.join(60)
    assert [box["value"] for _, box in started] == others
    wait_until(lambda: gen.stats().running == 0)
    # The closed row left at once and the others ended at 30 tokens, not 150.
    assert gen.stats().steps <= 31
    assert gen.stats().cancelled == 1
    gen.close()


def test_asyncio_api_matches_the_sync_one(gen: Generator) -> None:
    lone = [gen.generate(conv, **options) for conv, options in MIXED]

    async def main() -> None:
        results = await asyncio.gather(*(gen.agenerate(c, **o) for c, o in MIXED))
        assert list(results) == lone
        for (conv, options), expected in zip(MIXED, lone, strict=True):
            stream = gen.astream(conv, **options)
            assert "".join([piece async for piece in stream]) == expected.text
            assert stream.result == expected
        batch = await gen.agenerate_batch([c for c, _ in MIXED], max_new_tokens=5)
        assert batch == gen.generate_batch([c for c, _ in MIXED], max_new_tokens=5)

    asyncio.run(main())


def test_the_event_loop_keeps_ticking_while_the_model_runs(
    generators: dict[str, Generator],
) -> None:
    gen = generators["idefics2"]
    convs = [Conversation().user(picture(300, 200, seed=s), "Describe it.") for s in range(6)]

    async def main() -> float:
        gaps: list[float] = []
        running = True

        async def heartbeat() -> None:
            last = time.perf_counter()
            while running:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.02)
        await asyncio.gather(
            gen.agenerate_batch(convs, max_new_tokens=20),
            *(gen.agenerate(c, max_new_tokens=20) for c in convs[:3]),
            _drain(gen.astream(convs[4], max_new_tokens=20)),
        )
        running = False
        await ticker
        return max(gaps)

    assert asyncio.run(main()) < 0.25


def test_async_calls_waiting_for_an_executor_thread_share_one_batch(
    generators: dict[str, Generator],
) -> None:
    # With one executor thread, the calls prepare one after another; each
    # counts as arriving from its call on, so the worker waits for them all.
    gen = fresh(generators["idefics2"], max_batch_size=8)
    convs = [SHORT, LONG, TWO, SHORT, LONG, TWO]

    async def main() -> list[Result]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        return await asyncio.gather(*(gen.agenerate(c, max_new_tokens=3) for c in convs))

    results = asyncio.run(main())
    assert results == [generators["idefics2"].generate(c, max_new_tokens=3) for c in convs]
    assert (gen.stats().batches, gen.stats().rows) == (1, len(convs))
    gen.close()


async def _drain(stream: Any) -> str:
    return "".join([piece async for piece in stream])


def test_a_cancelled_task_frees_its_row(
    generators: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = generators["idefics2"]
    assert base.generate(LONG, max_new_tokens=150).usage.completion_tokens >= 100
    expected = base.generate(SHORT, max_new_tokens=4)
    gen = fresh(base)

    async def main() -> None:
        # Cancelled while queued: never runs.
        with held(gen):
            queued = asyncio.create_task(gen.agenerate(LONG, max_new_tokens=150))
            await _until(lambda: gen.stats().queued == 1)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
        assert await gen.agenerate(SHORT, max_new_tokens=4) == expected
        assert gen.stats().rows == 1
        # Cancelled while running: its row stops at the next step.
        running = asyncio.create_task(gen.agenerate(LONG, max_new_tokens=150))
        await _until(lambda: gen.stats().running == 1)
        started = time.perf_counter()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await _until(lambda: gen.stats().running == 0)
        assert time.perf_counter() - started < 2.0
        assert await gen.agenerate(SHORT, max_new_tokens=4) == expected

    asyncio.run(main())
    assert gen.stats().cancelled == 2
    gen.close()


async def _until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_a_full_queue_fails_at_once_with_overloaded_error(gen: Generator) -> None:
    small = fresh(gen, max_queued=2)
    with held(small):
        waiting = [in_thread(lambda: small.generate(SHORT, max_new_tokens=2)) for _ in range(2)]
        wait_until(lambda: small.stats().queued == 2)
        started = time.perf_counter()
        with pytest.raises(OverloadedError, match=r"max_queued=2") as raised:
            small.generate(SHORT, max_new_tokens=2)
        assert time.perf_counter() - started < 1.0
        assert isinstance(raised.value, OverloadedError)

        async def overloaded() -> None:
            with pytest.raises(OverloadedError):
                await small.agenerate(SHORT, max_new_tokens=2)

        asyncio.run(overloaded())
    for thread, box in waiting:
        thread.join(60)
        assert box["value"].ok
    # A batch call larger than the queue is fed in as room frees up.
    results = small.generate_batch([SHORT] * 5, max_new_tokens=2)
    assert results == [gen.generate(SHORT, max_new_tokens=2)] * 5
    small.close()


def test_timeout_raises_and_frees_the_row(gen: Generator) -> None:
    timed = fresh(gen)
    with held(timed):
        with pytest.raises(RequestTimeoutError, match=r"timeout=0.05s") as raised:
            timed.generate(SHORT, max_new_tokens=4, timeout=0.05)
        assert isinstance(raised.value, TimeoutError)
        with pytest.raises(RequestTimeoutError):
            list(timed.stream(SHORT, max_new_tokens=4, timeout=0.05))
        with pytest.raises(RequestTimeoutError):
            timed.generate_batch([SHORT, TWO], max_new_tokens=4, timeout=0.05)

        async def late() -> None:
            with pytest.raises(RequestTimeoutError):
                await timed.agenerate(SHORT, max_new_tokens=4, timeout=0.05)

        asyncio.run(late())
    assert timed.generate(SHORT, max_new_tokens=4, timeout=60) == gen.generate(
        SHORT, max_new_tokens=4
    )
    stats = timed.stats()
    assert stats.rows == 1  # the timed-out requests never ran
    assert stats.cancelled == 5
    timed.close()


def test_close_fails_pending_requests_and_later_calls(gen: Generator) -> None:
    closing = fresh(gen)
    with held(closing):
        waiting = [in_thread(lambda: closing.generate(SHORT, max_new_tokens=2)) for _ in range(3)]
        wait_until(lambda: closing.stats().queued == 3)
        closer = threading.Thread(target=closing.close)
        closer.start()
        for thread, box in waiting:
            thread.join(30)
            assert isinstance(box["error"], GeneratorClosedError)
            assert "closed before this ran" in str(box["error"])
    closer.join(30)
    assert closing.closed
    with pytest.raises(GeneratorClosedError, match="this Generator is closed") as raised:
        closing.generate(SHORT)
    assert isinstance(raised.value, UsageError)
    with pytest.raises(GeneratorClosedError):
        closing.stream(SHORT)
    with pytest.raises(GeneratorClosedError):
        asyncio.run(closing.agenerate(SHORT))
    closing.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "idefics-kit-worker"
                and t.is_alive() and t is getattr(closing._scheduler, "_thread", None)]  # fmt: skip


def test_no_worker_thread_is_left_behind(gen: Generator) -> None:
    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "idefics-kit-worker"}

    before = workers()
    with fresh(gen) as scoped:
        scoped.generate(SHORT, max_new_tokens=2)
        assert len(workers() - before) == 1
    assert workers() == before

    async def scoped_async() -> None:
        async with fresh(gen) as inner:
            await inner.agenerate(SHORT, max_new_tokens=2)

    asyncio.run(scoped_async())
    assert workers() == before
    dropped = fresh(gen)
    dropped.generate(SHORT, max_new_tokens=2)
    del dropped
    gc.collect()
    wait_until(lambda: workers() == before, 10)


def test_keyboard_interrupt_affects_only_its_caller(gen: Generator) -> None:
    expected = gen.generate(TWO, max_new_tokens=6)
    shared = fresh(gen)
    # A real SIGINT to the main thread, as Ctrl-C sends: it interrupts the wait
    # itself. Python's handler is installed even when pytest runs as a
    # background job (where SIGINT may be ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with held(shared):
            other, box = in_thread(lambda: shared.generate(TWO, max_new_tokens=6))
            wait_until(lambda: shared.stats().queued == 1)
            main = threading.main_thread().ident
            assert main is not None
            timer = threading.Timer(0.3, signal.pthread_kill, args=(main, signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                shared.generate(SHORT, max_new_tokens=6)  # waits in the main thread
            timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    other.join(60)
    assert box["value"] == expected
    assert shared.generate(TWO, max_new_tokens=6) == expected
    assert shared.stats().cancelled == 1
    shared.close()


def test_a_failing_row_is_bisected_out_and_the_cost_is_counted(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    convs = [Conversation().user(IMG_A, "word " * (i + 1)) for i in range(8)]
    lone = [gen.generate(c, max_new_tokens=3) for c in convs]
    bad_length = len(gen.prompt_token_ids(convs[5]))
    real = engine.Engine.admit
    calls: list[int] = []

    def failing(self: engine.Engine, items: Any, rows: Any) -> None:
        calls.append(len(rows))
        if any(item.length == bad_length for item in items):
            raise GenerationError("the prefill failed: simulated")
        real(self, items, rows)

    monkeypatch.setattr(engine.Engine, "admit", failing)
    results = gen.generate_batch(convs, max_new_tokens=3, batch_size=8, on_error="return")
    assert [r.ok for r in results] == [i != 5 for i in range(8)]
    assert results[5].error is not None
    assert results[5].error.index == 5
    assert [r for i, r in enumerate(results) if i != 5] == [r for i, r in enumerate(lone) if i != 5]
    assert len(calls) == 7  # 8, then 4+4, 2+2, 1+1: one bad row costs 2*log2(8)+1 calls
    calls.clear()

    def broken(self: engine.Engine, items: Any, rows: Any) -> None:
        calls.append(len(rows))
        raise GenerationError("the prefill failed: broken model")

    monkeypatch.setattr(engine.Engine, "admit", broken)
    results = gen.generate_batch(convs[:4], max_new_tokens=3, batch_size=4, on_error="return")
    assert [r.finish_reason for r in results] == ["error"] * 4
    assert len(calls) == 7  # 2N-1 when every row fails
    calls.clear()
    # on_error="raise": the first failing input in order is raised, with its index.
    monkeypatch.setattr(engine.Engine, "admit", failing)
    with pytest.raises(GenerationError, match="simulated") as raised:
        gen.generate_batch(convs, max_new_tokens=3, batch_size=8)
    assert raised.value.index == 5


def test_errors_carry_their_batch_index_not_in_their_message(gen: Generator) -> None:
    results = gen.generate_batch([SHORT, Conversation()], on_error="return", max_new_tokens=2)
    error = results[1].error
    assert error is not None
    assert error.index == 1
    assert str(error) == "conversation is empty: add a user turn with Conversation().user(...)"


def test_scheduler_settings_are_validated(gen: Generator) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_batch_size": 0}, "max_batch_size must be an int >= 1 or 'auto', got 0"),
        ({"max_batch_size": "big"}, "max_batch_size must be an int >= 1 or 'auto', got 'big'"),
        ({"max_wait_ms": -1}, "max_wait_ms must be a finite number >= 0 (0: never wait), got -1"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms must be a finite number >= 0"),
        ({"max_queued": 0}, "max_queued must be an int >= 1, got 0"),
        ({"max_queued": True}, "max_queued must be an int >= 1, got True"),
    ]
    for settings, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fresh(gen, **settings)
    with pytest.raises(UsageError, match=r"timeout must be None or a number of seconds > 0"):
        gen.generate(SHORT, timeout=0)


def test_stats_count_tokens_and_batches(gen: Generator) -> None:
    counted = fresh(gen)
    assert counted.stats().mean_batch_size == 0.0
    results = counted.generate_batch([SHORT, LONG, TWO], max_new_tokens=5, batch_size=3)
    stats = counted.stats()
    assert stats.generated_tokens == sum(r.usage.completion_tokens for r in results)
    assert stats.completed == 3
    assert stats.batches >= 1
    assert stats.rows == 3
    assert stats.tokens_per_second > 0
    counted.close()


def test_idefics1_padding_features_hold_no_autograd_graph(
    generators: dict[str, Generator],
) -> None:
    gen = generators["idefics"]
    gen.generate_batch([SHORT, TWO], max_new_tokens=2)  # one image vs two: padding slot
    paddings = list(gen._adapter._padding.values())  # type: ignore[attr-defined]
    assert len(paddings) == 1
    assert not paddings[0].requires_grad
    assert paddings[0].grad_fn is None


def test_a_dropped_stream_stops_its_row(gen: Generator) -> None:
    dropping = fresh(gen)
    with held(dropping):
        stream = dropping.stream(LONG, max_new_tokens=50)
        wait_until(lambda: dropping.stats().queued == 1)
        del stream
        gc.collect()
    assert dropping.generate(SHORT, max_new_tokens=2) == gen.generate(SHORT, max_new_tokens=2)
    stats = dropping.stats()
    assert (stats.cancelled, stats.rows) == (1, 1)  # never ran
    dropping.close()
