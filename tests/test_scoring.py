"""Scoring candidate answers: exact against a plain transformers forward pass, every family.

The reference concatenates the prompt ids with the choice's ids and runs one
forward pass of the model (IDEFICS 1's per-token image mask extended the way
``generate`` extends it); the log-probability of a choice is the sum of the
log-softmax of the logits before each of its tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import BatchFeature

from idefics_kit import (
    ChoiceScore,
    Conversation,
    ConversationError,
    Generator,
    InvalidParameterError,
)
from idefics_kit.scoring import choice_token_ids, score
from tests.conftest import picture

IMG_A = picture(40, 30, seed=1)
IMG_B = picture(24, 56, seed=2)
CASES = {
    "one_image": Conversation().user("What is in this image?", IMG_A),
    "two_images": Conversation().user(IMG_A, "and", IMG_B, "compare the two pictures"),
    "text_only": Conversation().user("Tell me a story about a dog."),
}
CHOICES = ["red", "a blue circle", "the yellow square is on the left", "no", "7"]


def encode(gen: Generator, conversation: Conversation) -> Any:
    adapter = gen._adapter
    images = [part.load() for part in conversation.images()]
    return BatchFeature(dict(adapter.encode([conversation], [images]))).to(gen.device)


def reference(gen: Generator, inputs: Any, ids: list[int]) -> float:
    full = dict(inputs)
    count = len(ids)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    mask = inputs["attention_mask"]
    full["attention_mask"] = torch.cat([mask, torch.ones(1, count, dtype=mask.dtype)], dim=1)
    if "image_attention_mask" in inputs:
        image_mask = inputs["image_attention_mask"]
        full["image_attention_mask"] = torch.cat(
            [image_mask, image_mask[:, -1:].expand(1, count, -1)], dim=1
        )
    with torch.inference_mode():
        logprobs = torch.log_softmax(gen.model(**full).logits[0].float(), dim=-1)
    start = int(inputs["input_ids"].shape[1]) - 1
    return sum(float(logprobs[start + j, token]) for j, token in enumerate(ids))


@pytest.mark.parametrize("case", sorted(CASES))
def test_score_matches_a_reference_forward_pass(gen: Generator, case: str) -> None:
    inputs = encode(gen, CASES[case])
    scores = score(gen.model, gen._adapter, inputs, CHOICES)
    assert [s.choice for s in scores] == CHOICES
    for result in scores:
        ids = list(choice_token_ids(gen._adapter, result.choice))
        assert result.num_tokens == len(ids)
        assert result.logprob == pytest.approx(reference(gen, inputs, ids), abs=1e-4)
        assert result.mean_logprob == pytest.approx(result.logprob / result.num_tokens)
        assert result.logprob < 0


def test_choices_per_pass_do_not_change_scores(gen: Generator) -> None:
    inputs = encode(gen, CASES["two_images"])
    together = score(gen.model, gen._adapter, inputs, CHOICES)
    one_by_one = score(gen.model, gen._adapter, inputs, CHOICES, rows=1)
    for a, b in zip(together, one_by_one, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@contextlib.contextmanager
def open_gates(model: Any) -> Iterator[None]:
    """IDEFICS 1's cross-attention gates start at zero (images have no effect): open them."""
    gates = [
        p
        for name, p in model.named_parameters()
        if name.endswith(("alpha_cross_attn", "alpha_dense"))
    ]
    saved = [p.detach().clone() for p in gates]
    with torch.no_grad():
        for p in gates:
            p.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(gates, saved, strict=True):
                p.copy_(value)


def test_scores_depend_on_the_image(gen: Generator) -> None:
    with open_gates(gen.model) if gen.family == "idefics" else contextlib.nullcontext():
        a = score(
            gen.model, gen._adapter, encode(gen, Conversation().user(IMG_A, "what?")), CHOICES
        )
        b = score(
            gen.model, gen._adapter, encode(gen, Conversation().user(IMG_B, "what?")), CHOICES
        )
    assert [x.logprob for x in a] != [y.logprob for y in b]


def test_choice_tokens_decode_to_the_choice(gen: Generator) -> None:
    for choice in CHOICES:
        assert gen._adapter.decode(choice_token_ids(gen._adapter, choice)) == choice


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ("red", "choices must be a list of strings, got 'red'"),
        ([], "choices must hold 1 to 1024 strings, got 0"),
        (["red", ""], "choices must hold only non-empty strings, got ''"),
        (["red", 3], "choices must hold only non-empty strings, got 3"),
        (["<image>"], "choice '<image>' cannot be written as an answer"),
    ],
)
def test_bad_choices_raise_before_model_work(
    generators: dict[str, Generator], choices: Any, message: str
) -> None:
    gen = generators["idefics2"]
    inputs = encode(gen, CASES["text_only"])
    with pytest.raises(InvalidParameterError, match="^" + message.replace("(", r"\(")) as info:
        score(gen.model, gen._adapter, inputs, choices)
    assert info.value.parameter == "choices"


def test_choice_score_is_a_frozen_value() -> None:
    value = ChoiceScore(choice="red", logprob=-1.0, mean_logprob=-0.5, num_tokens=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.logprob = 0.0  # type: ignore[misc]
    assert value == ChoiceScore(choice="red", logprob=-1.0, mean_logprob=-0.5, num_tokens=2)


def test_generator_score_runs_on_the_worker_and_matches(gen: Generator) -> None:
    conversation = CASES["two_images"]
    direct = score(gen.model, gen._adapter, encode(gen, conversation), CHOICES)
    for _ in range(2):  # the second call takes the image features from the vision cache
        via_generator = gen.score(conversation, CHOICES)
        assert [s.logprob for s in via_generator] == pytest.approx(
            [s.logprob for s in direct], abs=1e-4
        )
    batch = gen.score_batch(
        [CASES["one_image"], CASES["text_only"]], [["red", "no"], ["a blue circle"]]
    )
    assert [[s.choice for s in scores] for scores in batch] == [["red", "no"], ["a blue circle"]]
    shared = gen.score_batch([CASES["one_image"], CASES["text_only"]], ["red", "no"])
    assert [len(scores) for scores in shared] == [2, 2]
    assert shared[0][0].logprob == pytest.approx(batch[0][0].logprob, abs=1e-4)


def test_score_batch_checks_everything_before_model_work(generators: dict[str, Generator]) -> None:
    gen = generators["idefics3"]
    with pytest.raises(InvalidParameterError, match="one list per conversation"):
        gen.score_batch([CASES["one_image"]], [["red"], ["blue"]])
    with pytest.raises(InvalidParameterError, match="cannot be written"):
        gen.score_batch([CASES["one_image"], CASES["text_only"]], ["red", "<image>"])
    results = gen.score_batch([CASES["text_only"], Conversation()], ["red"], on_error="return")
    assert len(results[0]) == 1
    assert results[1] == []


def test_ascore_equals_score_and_keeps_the_event_loop_free(gen: Generator) -> None:
    conversation = CASES["two_images"]
    expected = gen.score(conversation, CHOICES)
    expected_batch = gen.score_batch(
        [CASES["one_image"], Conversation()], ["red", "no"], on_error="return"
    )

    async def scored() -> tuple[list[ChoiceScore], list[list[ChoiceScore]], int]:
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        beating = asyncio.create_task(heartbeat())
        await asyncio.sleep(0)
        try:
            one = await gen.ascore(conversation, CHOICES)
            many = await gen.ascore_batch(
                [CASES["one_image"], Conversation()], ["red", "no"], on_error="return"
            )
        finally:
            stop.set()
            await beating
        return one, many, ticks

    one, many, ticks = asyncio.run(scored())
    assert one == expected
    assert many == expected_batch
    assert many[1] == []
    assert ticks > 1  # the loop ran while the model scored


def test_ascore_raises_what_score_raises(gen: Generator) -> None:
    with pytest.raises(InvalidParameterError, match="cannot be written"):
        asyncio.run(gen.ascore(CASES["text_only"], ["red", "<image>"]))
    with pytest.raises(ConversationError):
        asyncio.run(gen.ascore_batch([Conversation()], ["red"]))
