"""Training examples: labels token by token against each family's own rendering, every family.

The reference renders the conversation independently of the SDK (the
processor's ``apply_chat_template`` on plain message dicts, or IDEFICS 1's
prompt list written out here), and the prompt before each answer must equal
what ``Generator.prompt_token_ids`` sends for generation: training and
inference see the same tokens.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from idefics_kit import Conversation, ConversationError, Generator
from idefics_kit.errors import InvalidParameterError, TrainingError
from idefics_kit.finetune import IGNORE_INDEX, Encoder, TrainingCollator, encode_for_training
from idefics_kit.finetune.trainer import causal_loss
from tests.conftest import picture

IMG_A = picture(40, 30, seed=1)
IMG_B = picture(24, 56, seed=2)
IMG_C = picture(33, 33, seed=3)
SYSTEM = "Answer briefly."
TURNS: list[tuple[str, list[Any]]] = [
    ("user", [IMG_A, "what is in this image?"]),
    ("assistant", ["a dog on the road"]),
    ("user", ["and these two?", IMG_B, IMG_C]),
    ("assistant", ["two cats, one red"]),
    ("user", ["which is bigger?"]),
    ("assistant", ["the first one"]),
]
ANSWERS = ["a dog on the road", "two cats, one red", "the first one"]


def conversation(
    turns: list[tuple[str, list[Any]]] = TURNS, system: str | None = SYSTEM
) -> Conversation:
    conv = Conversation(system=system)
    for role, parts in turns:
        conv = conv.user(*parts) if role == "user" else conv.assistant(*parts)
    return conv


def reference_ids(
    gen: Generator, turns: list[tuple[str, list[Any]]], system: str | None
) -> list[int]:
    """The full conversation, rendered by the processor itself (no SDK code)."""
    processor = gen.processor
    if gen.family == "idefics":
        items: list[Any] = [] if system is None else [f"System: {system}", "<end_of_utterance>"]
        for role, parts in turns:
            label = ("\n" if items else "") + role.capitalize() + ":"
            first = True
            for part in parts:
                if isinstance(part, str):
                    items.append(f"{label} {part}" if first else part)
                else:
                    if first:
                        items.append(label)
                    items.append(part)
                first = False
            items.append("<end_of_utterance>")
        encoded = processor(text=[items], add_end_of_utterance_token=False, return_tensors="pt")
    else:
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        for role, parts in turns:
            content = [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
                for p in parts
            ]
            messages.append({"role": role, "content": content})
        encoded = processor.apply_chat_template(
            messages,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    ids: list[int] = encoded["input_ids"][0].tolist()
    return ids


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for position, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    return runs


def test_labels_are_the_assistant_turns_token_by_token(gen: Generator) -> None:
    conv = conversation()
    example = encode_for_training(gen, conv)
    ids = example["input_ids"].tolist()
    labels = example["labels"].tolist()
    tokenizer = gen.processor.tokenizer
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")

    assert ids == reference_ids(gen, TURNS, SYSTEM)
    assert example["attention_mask"].tolist() == [1] * len(ids)
    runs = labelled_runs(labels)
    assert len(runs) == len(ANSWERS)
    targets = [i for i, turn in enumerate(conv.turns) if turn.role == "assistant"]
    for (start, end), answer, turn in zip(runs, ANSWERS, targets, strict=True):
        # Where each answer starts: right after the exact prompt generation sends.
        prompt = Conversation(system=SYSTEM, turns=conv.turns[:turn])
        assert ids[:start] == list(gen.prompt_token_ids(prompt))
        # What is labelled: the answer's tokens, then its end-of-turn token, nothing after.
        assert labels[start:end] == ids[start:end]
        assert ids[end - 1] == eou
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        assert text.strip() == f"{answer}<end_of_utterance>"
        assert eou not in ids[start : end - 1]
    # Every other position is -100: BOS, system and user text, every image and tile token.
    inside = {p for start, end in runs for p in range(start, end)}
    assert all(labels[p] == IGNORE_INDEX for p in range(len(ids)) if p not in inside)
    never = set(gen.banned_token_ids) | {tokenizer.bos_token_id}
    assert sum(1 for t in ids if t in never) > 3
    assert not any(labels[p] in never for p in inside)
    # Image inputs for the three images.
    if gen.family == "idefics":
        assert example["pixel_values"].shape[0] == 3
        assert example["image_attention_mask"].shape == (len(ids), 3)
    else:
        assert example["pixel_values"].dim() == 4
        assert example["pixel_attention_mask"].shape[0] == example["pixel_values"].shape[0]


def test_image_in_an_assistant_turn_is_never_a_label(gen: Generator) -> None:
    turns = [("user", ["draw it"]), ("assistant", ["here:", IMG_A, "done"])]
    example = encode_for_training(gen, conversation(turns, system=None))
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    images = [p for p, t in enumerate(ids) if t in set(gen.banned_token_ids)]
    assert images
    assert all(labels[p] == IGNORE_INDEX for p in images)
    assert ids == reference_ids(gen, turns, None)
    text = gen.processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert text.replace(" ", "") == "here:done<end_of_utterance>"


def test_too_long_is_refused_not_cut(gen: Generator) -> None:
    conv = conversation()
    length = len(encode_for_training(gen, conv)["input_ids"])
    encode_for_training(gen, conv, max_length=length)
    with pytest.raises(ConversationError, match=rf"is {length} tokens .* at most {length - 1} fit"):
        encode_for_training(gen, conv, max_length=length - 1)


def test_conversation_without_answer_is_refused(gen: Generator) -> None:
    with pytest.raises(ConversationError, match="no assistant turn"):
        encode_for_training(gen, Conversation().user(IMG_A, "what?"))
    with pytest.raises(ConversationError, match="expected a Conversation, got str"):
        encode_for_training(gen, "hello")  # type: ignore[arg-type]


def _encoder_with_template(gen: Generator, template: str) -> Encoder:
    processor = copy.deepcopy(gen.processor)
    processor.chat_template = template
    return Encoder.for_model(gen.model, processor)


def test_template_that_breaks_the_prefix_is_refused(generators: dict[str, Generator]) -> None:
    gen = generators["idefics2"]
    template = gen.processor.chat_template
    # The generation prompt ends with a space the rendered turn does not have there.
    broken = template.replace("{{ 'Assistant:' }}", "{{ 'Assistant:  ' }}")
    assert broken != template
    encoder = _encoder_with_template(gen, broken)
    with pytest.raises(TrainingError, match=r"assistant turn 1 \(0-based\) .* not a prefix"):
        encoder.encode(Conversation().user("hi").assistant("yes"))


def test_template_without_end_of_turn_is_refused(generators: dict[str, Generator]) -> None:
    gen = generators["smolvlm"]
    template = gen.processor.chat_template
    broken = template.replace("<end_of_utterance>", "")
    encoder = _encoder_with_template(gen, broken)
    with pytest.raises(TrainingError, match="no end-of-turn token"):
        encoder.encode(Conversation().user("hi").assistant("yes"))


# -- the collator ------------------------------------------------------------------------------


def _loss_sum(gen: Generator, batch: dict[str, torch.Tensor]) -> float:
    """The summed next-token loss over every labelled position of the batch."""
    with torch.inference_mode():
        outputs = gen.model(**{k: v for k, v in batch.items() if k != "labels"})
        return float(causal_loss(outputs, batch["labels"], num_items_in_batch=1))


@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_batch_has_each_rows_own_loss(gen: Generator, side: str) -> None:
    examples = [
        encode_for_training(gen, conversation()),
        encode_for_training(gen, Conversation().user("hi there").assistant("yes")),
        encode_for_training(gen, Conversation().user(IMG_B, "what?").assistant("a cat")),
    ]
    collator = TrainingCollator(
        pad_token_id=gen.processor.tokenizer.pad_token_id, padding_side=side
    )  # type: ignore[arg-type]
    batch = collator(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (3, longest)
    short = batch["labels"][1]
    padding = (
        short[len(examples[1]["input_ids"]) :]
        if side == "right"
        else short[: longest - len(examples[1]["input_ids"])]
    )
    assert padding.tolist() == [IGNORE_INDEX] * (longest - len(examples[1]["input_ids"]))
    alone = sum(_loss_sum(gen, collator([e])) for e in examples)
    together = _loss_sum(gen, batch)
    assert together == pytest.approx(alone, rel=1e-4)


def test_collator_rejects_bad_settings() -> None:
    with pytest.raises(
        InvalidParameterError, match="padding_side must be 'right' or 'left', got 'top'"
    ):
        TrainingCollator(pad_token_id=0, padding_side="top")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="empty batch"):
        TrainingCollator(pad_token_id=0)([])
