"""Prefill in parts: one micro-batch of very different prompt lengths.

The rows' prompts run through the model in parts of similar length and their
KV caches are joined for one shared decode. What a row gets must not change:
each answer equals its lone call, with any options next to it.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from idefics_kit import Conversation, GenerationError, Generator, engine, kv
from idefics_kit.batching import MAX_PREFILL_PARTS, PREFILL_PART_COST, prefill_parts
from tests.conftest import picture
from tests.test_concurrency import answered_together, fresh, held, wait_until
from tests.test_continuous import same_answer

IMG_A = picture(40, 30, seed=21)
IMG_B = picture(64, 48, seed=22)
IMG_C = picture(30, 60, seed=23)
LONG_TEXT = "Tell me everything about these pictures, the colours, the shapes, the mood. " * 3

# Prompt lengths from one image and two words to three images and a paragraph.
SPREAD: list[tuple[Conversation, dict[str, Any]]] = [
    (Conversation().user(IMG_A, "Hi"), {"max_new_tokens": 6}),
    (
        Conversation().user(IMG_A, "Compare", IMG_B, "and", IMG_C, LONG_TEXT),
        {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.8, "seed": 5},
    ),
    (Conversation().user(IMG_B, "What is this?"), {"max_new_tokens": 9, "stop": ["e"]}),
    (Conversation().user(IMG_C, IMG_A, LONG_TEXT), {"max_new_tokens": 8, "logprobs": True}),
    (Conversation().user(IMG_C, "Describe it."), {"max_new_tokens": 7, "repetition_penalty": 1.3}),
    (
        Conversation().user(IMG_B, IMG_C, IMG_A, "Which one is darkest?"),
        {"max_new_tokens": 12},
    ),
]


def padded_cost(lengths: list[int], parts: list[list[int]]) -> float:
    tokens = sum(len(part) * max(lengths[i] for i in part) for part in parts)
    return tokens + len(parts) * PREFILL_PART_COST * sum(lengths)


def cheapest_cost(lengths: list[int]) -> float:
    """Every split of the sorted rows into at most MAX_PREFILL_PARTS runs, tried."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = float("inf")
    for parts in range(1, min(MAX_PREFILL_PARTS, len(order)) + 1):
        for cuts in itertools.combinations(range(1, len(order)), parts - 1):
            bounds = [0, *cuts, len(order)]
            split = [order[a:b] for a, b in itertools.pairwise(bounds)]
            best = min(best, padded_cost(lengths, split))
    return best


@pytest.mark.parametrize(
    "seed", [*range(4), *(pytest.param(seed, marks=pytest.mark.slow) for seed in range(4, 40))]
)
def test_prefill_parts_is_the_cheapest_split(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 400) for _ in range(rng.randint(1, 10))]
    parts = prefill_parts(lengths)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    assert 1 <= len(parts) <= MAX_PREFILL_PARTS
    # Parts are runs of the sorted lengths: no part reaches into another's range.
    for first, second in itertools.pairwise(parts):
        assert max(lengths[i] for i in first) <= min(lengths[i] for i in second)
    assert padded_cost(lengths, parts) == pytest.approx(cheapest_cost(lengths))


def test_prefill_parts_splits_only_when_padding_costs_more_than_a_part() -> None:
    assert prefill_parts([100] * 16) == [list(range(16))]
    assert prefill_parts([100, 104, 98, 101]) == [[2, 0, 3, 1]]  # 2% padding: one part, by length
    assert prefill_parts([10] * 8 + [200] * 8) == [list(range(8)), list(range(8, 16))]
    assert prefill_parts([7]) == [[0]]


def counted_parts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Row counts of the prefill parts run from now on."""
    sizes: list[int] = []
    real = engine.Engine._prefill

    def counting(self: engine.Engine, items: Any) -> Any:
        sizes.append(len(items))
        return real(self, items)

    monkeypatch.setattr(engine.Engine, "_prefill", counting)
    return sizes


@pytest.mark.parametrize("vision_cache_mb", [0, 64])
def test_rows_of_spread_lengths_match_their_lone_calls(
    gen: Generator, family: str, vision_cache_mb: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    lone = [gen.generate(conv, **options) for conv, options in SPREAD]
    lengths = [len(gen.prompt_token_ids(conv)) for conv, _ in SPREAD]
    assert len(prefill_parts(lengths)) > 1, lengths  # the case under test
    sizes = counted_parts(monkeypatch)
    shared = fresh(gen, max_batch_size=8, vision_cache_mb=vision_cache_mb)
    got = answered_together(shared, SPREAD)
    assert shared.stats().batches == 1
    shared.close()
    if family == "idefics":
        assert sizes == [len(SPREAD)]  # cross-attention state: one prefill, never in parts
    else:
        assert len(sizes) == len(prefill_parts(lengths))
        assert sum(sizes) == len(SPREAD)
    for result, expected in zip(got, lone, strict=True):
        same_answer(result, expected)


def test_streams_in_a_batch_prefilled_in_parts(
    generators: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = generators["idefics3"]
    lone = [gen.generate(conv, **options) for conv, options in SPREAD]
    sizes = counted_parts(monkeypatch)
    shared = fresh(gen, max_batch_size=8)
    with held(shared):
        streams = [shared.stream(conv, **options) for conv, options in SPREAD]
        wait_until(lambda: shared.stats().queued == len(SPREAD))
    for stream, expected in zip(streams, lone, strict=True):
        assert "".join(stream) == expected.text
        assert stream.result is not None
        assert stream.result.token_ids == expected.token_ids
    assert len(sizes) > 1
    shared.close()


def test_a_failing_prefill_costs_no_row(
    generators: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An admission whose prefill fails is bisected down to single rows,
    # which prefill whole (no parts) and succeed on their own.
    gen = generators["idefics2"]
    convs = [conv for conv, _ in SPREAD]
    lone = [gen.generate(conv, max_new_tokens=4) for conv in convs]
    sizes: list[int] = []
    real = engine.Engine._prefill

    def failing(self: engine.Engine, items: Any) -> Any:
        sizes.append(len(items))
        if len(items) > 1:
            raise GenerationError("the prefill failed: simulated kernel failure")
        return real(self, items)

    monkeypatch.setattr(engine.Engine, "_prefill", failing)
    results = gen.generate_batch(convs, max_new_tokens=4, batch_size=8, on_error="return")
    assert results == lone
    assert max(sizes) > 1  # the parts were tried
    monkeypatch.undo()
    broken = fresh(gen)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return 1 / 0

    monkeypatch.setattr(broken.model, "forward", forward)
    with pytest.raises(GenerationError, match=r"^the prefill failed: ZeroDivisionError: "):
        broken.generate(convs[0], max_new_tokens=4)
    monkeypatch.undo()
    assert broken.generate(convs[0], max_new_tokens=4) == lone[0]  # the worker went on
    broken.close()


def test_a_sliding_window_shorter_than_the_prompt_is_never_joined(
    generators: dict[str, Generator],
) -> None:
    # Mistral (IDEFICS 2's text model) has a sliding window; past it, a
    # row's cache would already have dropped positions that the others keep.
    gen = generators["idefics2"]
    window = gen.model.config.get_text_config(decoder=True).sliding_window
    assert isinstance(window, int)
    assert kv.joinable(gen.model, window - 1)
    assert not kv.joinable(gen.model, window)
    assert kv.joinable(generators["idefics3"].model, 100_000)  # Llama: no window


def test_prefill_parts_of_a_large_batch_stay_cheap_and_whole() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(10, 3000) for _ in range(256)]  # cuts limited to 64 places
    parts = prefill_parts(lengths)
    assert sorted(i for part in parts for i in part) == list(range(256))
    assert 1 < len(parts) <= MAX_PREFILL_PARTS
    for first, second in itertools.pairwise(parts):
        assert max(lengths[i] for i in first) <= min(lengths[i] for i in second)
    assert padded_cost(lengths, parts) < padded_cost(lengths, [list(range(256))])


def test_rows_that_cannot_share_the_batch_run_alone(
    generators: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = fresh(generators["smolvlm"])
    convs = [conv for conv, _ in SPREAD]
    lone = [gen.generate(conv, max_new_tokens=5) for conv in convs]
    # A sliding window shorter than prompt + answer: each row runs on its own.
    monkeypatch.setattr(engine, "joinable", lambda model, length: False)
    before = gen.stats()
    assert gen.generate_batch(convs, max_new_tokens=5, batch_size=8) == lone
    after = gen.stats()
    assert (after.batches - before.batches, after.rows - before.rows) == (len(convs), len(convs))
    # Every decoding step ran one row.
    assert after.row_steps - before.row_steps == after.steps - before.steps > 0
    gen.close()
