"""Token-level parity with the reference transformers path, for every family.

The reference is written here by hand from the model cards and transformers'
docs, independently of the SDK's adapters: its stop and banned ids come from
the checkpoint's generation config plus the token names, not from the SDK.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from idefics_kit import Conversation, Generator
from tests.conftest import picture

MAX_NEW = 16
BANNED = {
    "idefics": ["<image>", "<fake_token_around_image>"],
    "idefics2": ["<image>", "<fake_token_around_image>"],
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
}
BANNED["smolvlm"] = BANNED["idefics3"]

IMG_A = picture(40, 30, seed=1)
IMG_B = picture(24, 56, seed=2)


def cases() -> dict[str, tuple[Conversation, list[Any], list[dict[str, Any]]]]:
    """name -> (SDK conversation, IDEFICS 1 prompt list, chat messages)."""

    def msg(role: str, *content: Any) -> dict[str, Any]:
        blocks = [
            {"type": "image", "image": c}
            if isinstance(c, Image.Image)
            else {"type": "text", "text": c}
            for c in content
        ]
        return {"role": role, "content": blocks}

    return {
        "one_image": (
            Conversation().user("What is in this image?", IMG_A),
            ["User: What is in this image?", IMG_A, "<end_of_utterance>", "\nAssistant:"],
            [msg("user", "What is in this image?", IMG_A)],
        ),
        "two_images": (
            Conversation().user(IMG_A, "and", IMG_B, "compare the two pictures"),
            [
                "User:",
                IMG_A,
                "and",
                IMG_B,
                "compare the two pictures",
                "<end_of_utterance>",
                "\nAssistant:",
            ],
            [msg("user", IMG_A, "and", IMG_B, "compare the two pictures")],
        ),
        "text_only": (
            Conversation().user("Tell me a story about a dog."),
            ["User: Tell me a story about a dog.", "<end_of_utterance>", "\nAssistant:"],
            [msg("user", "Tell me a story about a dog.")],
        ),
        "two_turns": (
            Conversation()
            .user("What is in this image?", IMG_A)
            .assistant("A red car.")
            .user("Are you sure?"),
            [
                "User: What is in this image?",
                IMG_A,
                "<end_of_utterance>",
                "\nAssistant: A red car.<end_of_utterance>",
                "\nUser: Are you sure?",
                "<end_of_utterance>",
                "\nAssistant:",
            ],
            [
                msg("user", "What is in this image?", IMG_A),
                msg("assistant", "A red car."),
                msg("user", "Are you sure?"),
            ],
        ),
    }


def reference(
    gen: Generator, family: str, prompt: list[Any], messages: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """(input ids, generated ids cut at the first stop token) the transformers way."""
    model, processor = gen.model, gen.processor
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    eos.append(tokenizer.convert_tokens_to_ids("<end_of_utterance>"))
    bad = [[tokenizer.convert_tokens_to_ids(t)] for t in BANNED[family]]
    if family == "idefics":
        inputs = processor(text=prompt, add_end_of_utterance_token=False, return_tensors="pt")
    else:
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    with torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, bad_words_ids=bad
        )
    prompt_ids = inputs["input_ids"][0].tolist()
    generated = out[0, len(prompt_ids) :].tolist()
    for i, token in enumerate(generated):
        if token in eos:
            generated = generated[:i]
            break
    return prompt_ids, generated


@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only", "two_turns"])
def test_generate_matches_reference(gen: Generator, family: str, case: str) -> None:
    conversation, prompt, messages = cases()[case]
    ref_prompt, ref_ids = reference(gen, family, prompt, messages)
    result = gen.generate(conversation, max_new_tokens=MAX_NEW)
    assert gen.prompt_token_ids(conversation) == tuple(ref_prompt)
    assert result.token_ids == tuple(ref_ids)
    assert result.usage.prompt_tokens == len(ref_prompt)
    assert result.usage.completion_tokens == len(ref_ids)
    expected_reason = "length" if len(ref_ids) == MAX_NEW else "stop"
    assert result.finish_reason == expected_reason


def test_exactly_one_bos(gen: Generator) -> None:
    bos = gen.processor.tokenizer.bos_token_id
    for conversation, _, _ in cases().values():
        ids = gen.prompt_token_ids(conversation)
        assert ids[0] == bos
        assert ids.count(bos) == 1


def test_answers_depend_on_the_input(gen: Generator) -> None:
    # Guards the parity test against a model that ignores its input.
    answers = {gen.generate(c, max_new_tokens=MAX_NEW).token_ids for c, _, _ in cases().values()}
    assert len(answers) > 1


def test_batch_equals_singles_in_input_order(gen: Generator) -> None:
    conversations = [c for c, _, _ in cases().values()]
    conversations = conversations + conversations[::-1]
    singles = [gen.generate(c, max_new_tokens=MAX_NEW) for c in conversations]
    for batch_size in (2, 3, 8):
        batched = gen.generate_batch(conversations, max_new_tokens=MAX_NEW, batch_size=batch_size)
        assert [r.token_ids for r in batched] == [r.token_ids for r in singles]
        assert [r.usage for r in batched] == [r.usage for r in singles]
        assert [r.text for r in batched] == [r.text for r in singles]
