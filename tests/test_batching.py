"""The batch engine: collation, length-aware planning, errors per item, OOM splits,
streaming input, seeded sampling."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from idefics_kit import (
    Conversation,
    ConversationError,
    GenerationError,
    Generator,
    ImageLoadError,
    ImagePart,
    InvalidParameterError,
    engine,
)
from idefics_kit.batching import collate, plan
from idefics_kit.runner import estimate_batch_size
from tests.conftest import picture

A = Conversation().user("What is in this image?", picture(40, 30, seed=1))
B = Conversation().user(picture(20, 60, seed=2), "and", picture(30, 30, seed=3), "compare them")
C = Conversation().user("Tell me a long story about a dog, a cat and a bird in the city.")
D = A.assistant("A red car.").user("Are you sure?")
BAD_IMAGE = Conversation().user(ImagePart.from_bytes(b"not an image"), "What?")


def test_collate_equals_the_processor_batch(gen: Generator, family: str) -> None:
    convs = [A, B] if family != "idefics" else [A, B, C]
    images = [[p.load() for p in c.images()] for c in convs]
    singles = [dict(gen._adapter.encode([c], [i])) for c, i in zip(convs, images, strict=True)]
    reference = gen._adapter.encode(convs, images)
    collated = collate(singles, gen._adapter.sequence_keys)
    assert sorted(collated) == sorted(reference)
    for key, value in reference.items():
        assert collated[key].shape == value.shape, key
        assert torch.equal(collated[key], value), key


def test_plan_groups_by_length_within_kind() -> None:
    lengths = [50, 10, 48, 12, 30, 11]
    groups = ["img", "txt", "img", "txt", "img", "txt"]
    batches = plan(lengths, groups, batch_size=2)
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(6))
    assert all(len(b) <= 2 for b in batches)
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert [sorted(lengths[i] for i in b) for b in batches] == [[30, 48], [50], [10, 11], [12]]


def test_batch_size_auto_and_any_size_equal_singles(gen: Generator) -> None:
    convs = [A, C, B, D, C, A, B]
    singles = [gen.generate(c, max_new_tokens=10) for c in convs]
    for size in ("auto", 1, 2, 5):
        assert gen.generate_batch(convs, max_new_tokens=10, batch_size=size) == singles


def test_on_error_return_keeps_every_input_in_order(gen: Generator) -> None:
    convs: list[Any] = [A, BAD_IMAGE, C, Conversation(), "nope", D]
    results = gen.generate_batch(convs, max_new_tokens=6, on_error="return", batch_size=2)
    assert len(results) == len(convs)
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    for index in (0, 2, 5):
        assert results[index] == gen.generate(convs[index], max_new_tokens=6)
    assert isinstance(results[1].error, ImageLoadError)
    assert [r.error.index for r in results if r.error] == [1, 3, 4]
    assert isinstance(results[3].error, ConversationError)
    assert str(results[3].error).startswith("conversation is empty")
    assert str(results[4].error) == (
        "expected a Conversation, got str; build one with Conversation().user(...)"
    )
    failed = results[1]
    assert (failed.text, failed.token_ids, failed.finish_reason) == ("", (), "error")
    assert failed.usage.prompt_tokens == failed.usage.completion_tokens == 0


def test_on_error_raise_names_the_index(gen: Generator) -> None:
    with pytest.raises(ImageLoadError, match=r"^'<bytes") as raised:
        gen.generate_batch([A, C, BAD_IMAGE, D], max_new_tokens=4)
    assert raised.value.index == 2
    with pytest.raises(
        InvalidParameterError, match="on_error must be 'raise' or 'return', got 'skip'"
    ):
        gen.generate_batch([A], on_error="skip")  # type: ignore[arg-type]


def test_out_of_memory_splits_batches_down_to_one(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    convs = [A, B, C, D, A, C]
    singles = [gen.generate(c, max_new_tokens=8) for c in convs]
    real = engine.Engine.admit
    sizes: list[int] = []

    def tight_memory(self: engine.Engine, items: Any, rows: Any) -> None:
        sizes.append(len(rows))
        if len(rows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real(self, items, rows)

    monkeypatch.setattr(engine.Engine, "admit", tight_memory)
    assert gen.generate_batch(convs, max_new_tokens=8, batch_size=4) == singles
    assert max(sizes) == 4
    assert sizes.count(1) == len(convs)

    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.Engine, "admit", no_memory)
    with pytest.raises(
        GenerationError, match="out of memory even for this conversation alone"
    ) as raised:
        gen.generate_batch(convs, max_new_tokens=8, batch_size=4)
    cause = raised.value.__cause__
    assert isinstance(cause, torch.OutOfMemoryError)
    # A kept error keeps no frames, hence no tensors of the failed attempt.
    assert cause.__traceback__ is None
    assert raised.value.index is not None
    results = gen.generate_batch(convs, max_new_tokens=8, batch_size=4, on_error="return")
    assert [r.finish_reason for r in results] == ["error"] * len(convs)
    assert [r.error.index if r.error else None for r in results] == list(range(6))


def test_a_decoding_step_out_of_memory_sends_the_newest_rows_back(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    convs = [A, B, C, D]
    singles = [gen.generate(c, max_new_tokens=8) for c in convs]
    streamed = ["".join(gen.stream(c, max_new_tokens=8)) for c in convs]
    real = engine.Engine.step
    failed = {"n": 0}

    def tight_memory(self: engine.Engine) -> None:
        if len(self.rows) > 2 and failed["n"] < 2:
            failed["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real(self)

    monkeypatch.setattr(engine.Engine, "step", tight_memory)
    shared = Generator.from_model(gen.model, gen.processor, max_batch_size=4)
    streams = [shared.stream(c, max_new_tokens=8) for c in convs]
    assert ["".join(s) for s in streams] == streamed  # restarted rows repeat no piece
    assert [s.result for s in streams] == singles
    assert shared.stats().preempted >= 2
    assert shared.generate_batch(convs, max_new_tokens=8) == singles
    shared.close()


def test_iter_batch_reads_lazily_and_yields_in_order(gen: Generator) -> None:
    pulled: list[int] = []
    pool = [A, B, C, D]

    def source() -> Iterator[Conversation]:
        for i in itertools.count():
            pulled.append(i)
            yield pool[i % 4]

    results = gen.iter_batch(source(), max_new_tokens=6, batch_size=2, window=4)
    first = list(itertools.islice(results, 6))
    assert len(pulled) <= 12  # three windows at most: the current, the next, being read
    expected = [gen.generate(pool[i % 4], max_new_tokens=6) for i in range(6)]
    assert first == expected


def test_iter_batch_with_bad_items(gen: Generator) -> None:
    convs = [A, BAD_IMAGE, C] * 3
    results = list(gen.iter_batch(convs, max_new_tokens=4, window=2, on_error="return"))
    assert [r.ok for r in results] == [True, False, True] * 3
    assert [r.error.index for r in results if r.error] == [1, 4, 7]


def test_seeded_sampling_does_not_depend_on_the_batch(gen: Generator) -> None:
    options = {"max_new_tokens": 10, "temperature": 1.3, "top_p": 0.95, "top_k": 40, "seed": 7}
    convs = [A, C, B, D]
    singles = [gen.generate(c, **options) for c in convs]
    assert gen.generate_batch(convs, batch_size=4, **options) == singles
    assert gen.generate_batch(convs, batch_size=3, **options) == singles
    assert "".join(gen.stream(C, **options)) == singles[1].text
    greedy = [gen.generate(c, max_new_tokens=10) for c in convs]
    assert singles != greedy


def test_progress_bar_on_stderr(gen: Generator, capsys: pytest.CaptureFixture[str]) -> None:
    gen.generate_batch([A, C], max_new_tokens=2, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err
    assert "tokens_per_s" in err


def test_estimate_batch_size() -> None:
    # idefics2-8b's Mistral-7B text model: 32 layers, 8 KV heads of 128, hidden 4096.
    config = SimpleNamespace(
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=32,
        hidden_size=4096,
    )
    per_token = 2 * 32 * 8 * 128 * 2 + 4 * 4096 * 2
    free = 40 * 2**30
    expected = int(free * 0.6) // (1000 * per_token)
    assert estimate_batch_size(config, torch.bfloat16, 1000, free) == expected
    assert estimate_batch_size(config, torch.bfloat16, 10**9, free) == 1
    assert estimate_batch_size(config, torch.bfloat16, 1, 10**15) == 256


def test_closing_iter_batch_does_not_wait_for_queued_preparation(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from idefics_kit import runner

    real = runner.prepare

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "prepare", slow)
    results = gen.iter_batch(iter([A] * 40), max_new_tokens=2, window=20)
    next(results)
    start = time.perf_counter()
    results.close()
    assert time.perf_counter() - start < 1.5  # not 20 queued items x 0.2 s / 2 threads
