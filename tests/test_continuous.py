"""Continuous batching: rows join and leave a running batch; requests stop in any stage.

Every family: requests that arrive while others decode, leave early, are
cancelled or sample with their own seed get the tokens a lone call gets.
Faults are injected into the worker: it fails the requests they concern and
goes on, or, failing again and again, stops with a typed error that every
later call gets at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from idefics_kit import (
    Conversation,
    EngineFailedError,
    GenerationError,
    Generator,
    ImagePart,
    OverloadedError,
    RequestTimeoutError,
    Result,
    scoring,
)
from tests.conftest import picture
from tests.test_concurrency import IMG_A, LONG, SHORT, TWO, fresh, held, in_thread, wait_until

CASES: list[tuple[Conversation, dict[str, Any]]] = [
    (SHORT, {"max_new_tokens": 3}),
    (TWO, {"max_new_tokens": 9, "temperature": 0.9, "top_p": 0.8, "seed": 3}),
    (SHORT, {"max_new_tokens": 10, "repetition_penalty": 1.4}),
    (LONG, {"max_new_tokens": 8, "temperature": 1.2, "top_k": 5, "seed": 7}),
    (TWO, {"max_new_tokens": 11, "stop": ["e", "a"]}),
    (SHORT, {"max_new_tokens": 6, "logprobs": True, "top_logprobs": 2}),
]


def same_answer(got: Result, expected: Result) -> None:
    assert got.token_ids == expected.token_ids
    assert (got.text, got.finish_reason, got.usage) == (
        expected.text,
        expected.finish_reason,
        expected.usage,
    )
    if expected.logprobs is None:
        assert got.logprobs is None
    else:
        assert got.logprobs is not None
        assert [t.token_id for t in got.logprobs] == [t.token_id for t in expected.logprobs]
        assert [t.logprob for t in got.logprobs] == pytest.approx(
            [t.logprob for t in expected.logprobs], abs=1e-4
        )
        assert [len(t.top_logprobs) for t in got.logprobs] == [
            len(t.top_logprobs) for t in expected.logprobs
        ]


def test_rows_joining_and_leaving_a_running_batch_get_lone_tokens(gen: Generator) -> None:
    anchor_lone = gen.generate(LONG, max_new_tokens=60)
    assert anchor_lone.usage.completion_tokens == 60, "needs a row that decodes all along"
    lone = [gen.generate(conv, **options) for conv, options in CASES]
    shared = fresh(gen, max_batch_size=4)
    anchor = shared.stream(LONG, max_new_tokens=60)
    anchor_pieces: list[str] = []
    reader = threading.Thread(target=lambda: anchor_pieces.extend(anchor))
    reader.start()
    # A request to cancel mid-decode, and the others arriving one by one,
    # each once the batch has decoded a few more steps.
    dropped = shared.stream(LONG, max_new_tokens=60)
    started = []
    for conv, options in CASES:
        steps = shared.stats().steps
        wait_until(lambda s=steps: shared.stats().steps >= s + 2)
        started.append(in_thread(lambda c=conv, o=options: shared.generate(c, **o)))
        if len(started) == 2:
            dropped.close()
    for thread, _ in started:
        thread.join(120)
    reader.join(120)
    for (_, box), expected in zip(started, lone, strict=True):
        same_answer(box["value"], expected)
    assert anchor.result == anchor_lone
    assert "".join(anchor_pieces) == anchor_lone.text
    stats = shared.stats()
    assert stats.batches >= len(CASES)  # they joined at different steps
    assert stats.row_steps > stats.steps  # ... and decoded together
    assert stats.cancelled == 1
    assert stats.running == 0
    shared.close()


def test_a_short_request_does_not_wait_for_long_rows(generators: dict[str, Generator]) -> None:
    base = generators["idefics2"]
    assert base.generate(LONG, max_new_tokens=150).usage.completion_tokens == 150
    expected = base.generate(SHORT, max_new_tokens=3)
    shared = fresh(base, max_batch_size=4)
    streams = [shared.stream(LONG, max_new_tokens=150) for _ in range(3)]
    wait_until(lambda: shared.stats().running == 3 and shared.stats().steps >= 3)
    assert shared.generate(SHORT, max_new_tokens=3) == expected
    # It joined the running batch and left it: the long rows still run.
    assert shared.stats().running == 3
    for stream in streams:
        stream.close()
    wait_until(lambda: shared.stats().running == 0)
    shared.close()


def test_a_cancelled_queued_request_gives_its_room_back_at_once(gen: Generator) -> None:
    small = fresh(gen, max_queued=2)
    expected = gen.generate(SHORT, max_new_tokens=2)
    with held(small):
        stream = small.stream(SHORT, max_new_tokens=2)
        other, box = in_thread(lambda: small.generate(SHORT, max_new_tokens=2))
        wait_until(lambda: small.stats().queued == 2)
        with pytest.raises(OverloadedError):
            small.generate(SHORT, max_new_tokens=2)
        stream.close()
        assert small.stats().queued == 1  # at once, while the worker is still held
        assert stream.request.stage == "done"
        third, third_box = in_thread(lambda: small.generate(SHORT, max_new_tokens=2))
        wait_until(lambda: small.stats().queued == 2)
    other.join(60)
    third.join(60)
    assert box["value"] == third_box["value"] == expected
    assert small.stats().cancelled == 1
    small.close()


def test_timeout_counts_from_the_call_and_stops_a_request_being_prepared(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed = fresh(gen)
    real = ImagePart.load
    slow = threading.Event()

    def slow_load(self: ImagePart) -> Any:
        if slow.is_set():
            time.sleep(1.0)  # a slow download
        return real(self)

    monkeypatch.setattr(ImagePart, "load", slow_load)
    slow.set()
    started = time.perf_counter()
    with pytest.raises(RequestTimeoutError):
        timed.generate(SHORT, max_new_tokens=2, timeout=0.2)
    assert time.perf_counter() - started < 0.8

    async def late() -> None:
        with pytest.raises(RequestTimeoutError):
            await timed.agenerate(SHORT, max_new_tokens=2, timeout=0.2)

    asyncio.run(late())
    time.sleep(1.2)  # the preparations end: cancelled, they are never queued
    assert timed.stats().rows == 0
    assert timed.stats().queued == 0
    slow.clear()
    assert timed.generate(SHORT, max_new_tokens=2, timeout=60) == gen.generate(
        SHORT, max_new_tokens=2
    )
    timed.close()


def test_score_takes_a_timeout_and_a_cancelled_ascore_stops_scoring(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored = fresh(gen)
    choices = ["red", "green", "blue"]
    expected = gen.score(SHORT, choices)
    passes: list[int] = []
    real = scoring._continuations

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(1)
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "_continuations", counted)
    with held(scored), pytest.raises(RequestTimeoutError):
        scored.score(SHORT, choices, timeout=0.1)
    assert passes == []  # timed out while queued: never scored
    many = [f"{word} {other}" for word in ("red", "green", "blue", "big") for other in choices]
    monkeypatch.setattr(scoring, "DEFAULT_ROWS", 1)  # one choice per pass: many passes

    async def cancel_midway() -> None:
        task = asyncio.create_task(scored.ascore(SHORT, many))
        while not passes:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    wait_until(lambda: scored.stats().running == 0)
    time.sleep(0.7)
    assert 1 <= len(passes) <= 3 < len(many)  # stopped at its next pass
    monkeypatch.setattr(scoring, "_continuations", real)
    assert scored.score(SHORT, choices) == expected
    scored.close()


def test_score_batch_on_error_return_covers_model_failures(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored = fresh(gen)
    expected = gen.score(SHORT, ["red", "green"])
    calls = {"n": 0}
    real = scoring.score

    def second_fails(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score", second_fails)
    results = scored.score_batch([SHORT, TWO, SHORT], ["red", "green"], on_error="return")
    assert results == [expected, [], expected]
    calls["n"] = 0
    with pytest.raises(GenerationError, match=r"^the model failed while scoring: RuntimeError"):
        scored.score_batch([SHORT, TWO], ["red", "green"])
    scored.close()


def test_an_exception_in_the_worker_fails_its_request_and_the_worker_goes_on(
    gen: Generator,
) -> None:
    shared = fresh(gen)
    expected = gen.generate(SHORT, max_new_tokens=2)
    real = shared._scheduler._max_batch_size
    failing = {"left": 1}

    def probe(*args: Any) -> int:
        # As torch.cuda.mem_get_info raises after a device error.
        if failing["left"]:
            failing["left"] -= 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args)

    shared._scheduler._max_batch_size = probe  # type: ignore[method-assign]
    with pytest.raises(GenerationError, match=r"^the model's worker failed: RuntimeError: CUDA"):
        shared.generate(SHORT, max_new_tokens=2)
    assert shared.ready
    assert shared.generate(SHORT, max_new_tokens=2) == expected
    shared.close()


def test_a_worker_that_keeps_failing_stops_and_every_call_fails_at_once(gen: Generator) -> None:
    broken = fresh(gen)

    def probe(*args: Any) -> int:
        raise RuntimeError("CUDA error: device lost")

    broken._scheduler._max_batch_size = probe  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(GenerationError):
            broken.generate(SHORT, max_new_tokens=2)
    wait_until(lambda: not broken.ready)
    assert isinstance(broken.failure, EngineFailedError)
    started = time.perf_counter()
    with pytest.raises(EngineFailedError, match=r"stopped after 3 failures in a row"):
        broken.generate(SHORT, max_new_tokens=2)
    with pytest.raises(EngineFailedError):
        asyncio.run(broken.agenerate(SHORT, max_new_tokens=2))
    with pytest.raises(EngineFailedError):
        broken.score(SHORT, ["red"])
    assert time.perf_counter() - started < 1.0
    broken.close()  # still idempotent


def test_streams_cancelled_in_every_stage_free_their_rows(gen: Generator) -> None:
    shared = fresh(gen, max_batch_size=2)
    expected = gen.generate(TWO, max_new_tokens=5)
    with held(shared):
        queued = shared.stream(LONG, max_new_tokens=40)
        wait_until(lambda: shared.stats().queued == 1)
        queued.close()  # queued
    running = shared.stream(LONG, max_new_tokens=40)
    wait_until(lambda: shared.stats().running == 1)
    running.close()  # running
    wait_until(lambda: shared.stats().running == 0)
    assert shared.generate(TWO, max_new_tokens=5) == expected
    assert shared.stats().cancelled == 2
    shared.close()


def test_many_callers_with_arrivals_and_cancellations_get_lone_answers(
    gen: Generator,
) -> None:
    convs = [
        Conversation().user(picture(30 + 4 * i, 30, seed=40 + i), "word " * i) for i in range(8)
    ]
    lone = [gen.generate(c, max_new_tokens=4 + 3 * (i % 4)) for i, c in enumerate(convs)]
    shared = fresh(gen, max_batch_size=3)
    started = []
    for i, conv in enumerate(convs):
        started.append(
            in_thread(lambda c=conv, n=4 + 3 * (i % 4): shared.generate(c, max_new_tokens=n))
        )
        if i % 3 == 2:
            stream = shared.stream(LONG, max_new_tokens=30)
            next(iter(stream), None)
            stream.close()
        time.sleep(0.01 * (i % 3))
    for (thread, box), expected in zip(started, lone, strict=True):
        thread.join(120)
        assert box["value"] == expected
    wait_until(lambda: shared.stats().running == 0)
    assert shared.stats().completed == len(convs)
    shared.close()


def test_idefics1_cross_attention_state_follows_its_rows(generators: dict[str, Generator]) -> None:
    # Rows with one and two images (image state padded when they share the
    # batch) join and leave at different steps.
    gen = generators["idefics"]
    plan = [(SHORT, 12), (TWO, 3), (Conversation().user(IMG_A, "Once more"), 7), (TWO, 9)]
    lone = [gen.generate(c, max_new_tokens=n) for c, n in plan]
    shared = fresh(gen, max_batch_size=4)
    started = []
    for conv, count in plan:
        steps = shared.stats().steps
        started.append(in_thread(lambda c=conv, n=count: shared.generate(c, max_new_tokens=n)))
        wait_until(lambda s=steps: shared.stats().steps > s or shared.stats().running == 0)
    for (thread, box), expected in zip(started, lone, strict=True):
        thread.join(60)
        assert box["value"] == expected
    shared.close()


def test_results_say_where_their_time_went(generators: dict[str, Generator]) -> None:
    gen = fresh(generators["idefics3"], max_batch_size=1)
    called = time.monotonic()
    lone = gen.generate(SHORT, max_new_tokens=3)
    returned = time.monotonic()
    timing = lone.timing
    assert timing is not None
    assert 0 <= timing.prepare_s <= timing.first_token_s <= timing.total_s <= returned - called
    assert timing.queue_s >= 0
    assert timing.prefill_s > 0
    assert timing.decode_s > 0
    assert timing.prepare_s + timing.queue_s + timing.prefill_s == pytest.approx(
        timing.first_token_s
    )
    # One row at a time: a request asked while a long one runs waits in the queue for it.
    long_called = time.monotonic()
    stream = gen.stream(LONG, max_new_tokens=40)
    wait_until(lambda: gen.stats().running == 1)
    short_called = time.monotonic()
    short = gen.generate(SHORT, max_new_tokens=3)
    for _piece in stream:
        pass
    long = stream.result
    assert long is not None
    assert long.timing is not None
    assert short.timing is not None
    long_done = long_called + long.timing.total_s
    short_admitted = short_called + short.timing.prepare_s + short.timing.queue_s
    assert short_admitted >= long_done - 0.01
    assert short.timing.queue_s > long.timing.decode_s / 4
    # Equality ignores timing; batch results and stream results carry theirs.
    assert short == lone
    assert short.timing != lone.timing
    results = gen.generate_batch([SHORT, TWO], max_new_tokens=2)
    assert all(r.timing is not None and r.timing.total_s > 0 for r in results)
    # A failed input's result has none.
    broken = Conversation().user(ImagePart.from_bytes(b"not an image"), "What?")
    failed = gen.generate_batch([broken, SHORT], max_new_tokens=2, on_error="return")
    assert failed[0].error is not None
    assert failed[0].timing is None
    assert failed[1].timing is not None
    gen.close()
