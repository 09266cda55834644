"""One conversation as a training example: input ids, labels and image inputs.

The labels are right by construction, for every family:

* The conversation is rendered by the family adapter's own formatting (the
  checkpoint's chat template, or IDEFICS 1's interleaved prompt list), the
  same code that builds prompts for generation.
* Each assistant turn's tokens are found by rendering prefixes: the
  conversation up to the turn's start *with* the generation prompt (exactly
  the prompt :meth:`Generator.generate` would send) and the conversation up to
  and including the turn. The turn is the token ids the second has beyond the
  first. Both must be token-for-token prefixes of the full rendering; a
  template or tokenizer that breaks this (merging tokens across the turn
  boundary) is refused with :class:`~idefics_kit.errors.TrainingError`, never
  trained on silently.
* A turn's labels run up to and including its end-of-turn token (the first
  stop token: ``<end_of_utterance>``, or ``</s>``); what the template adds
  after it (a newline) is context, not target. Image, tile and
  image-boundary tokens (and the newlines between an image's rows of tiles)
  are never labels, not even inside an assistant turn.
* Everything else (BOS, system and user text, images, the generation prompt
  ``Assistant:``) is -100, and padding added by the collator is too.

Nothing is ever truncated: a conversation longer than the limit is refused
with a :class:`~idefics_kit.errors.ConversationError` that gives its length.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from idefics_kit.conversation import Conversation, TextPart
from idefics_kit.errors import ConversationError, TrainingError
from idefics_kit.families import FamilyAdapter
from idefics_kit.families.base import LoadedImages

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = ["IGNORE_INDEX", "Encoder", "assistant_turns", "encode_for_training"]

IGNORE_INDEX = -100
"""The label of a position that is not trained on (PyTorch's cross-entropy default)."""

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "image_attention_mask")
"""Model inputs aligned with the tokens: their batch dimension goes, their length stays."""


def assistant_turns(conversation: Conversation) -> list[int]:
    """Indices of the assistant turns (the training targets) of ``conversation``."""
    return [i for i, turn in enumerate(conversation.turns) if turn.role == "assistant"]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Span:
    start: int
    end: int
    """One past the turn's end-of-turn token."""


class Encoder:
    """Turns conversations into training examples for one model's family.

    Built from a model and its processor (``Encoder.for_model``) or a
    :class:`~idefics_kit.Generator`; holds the family adapter, so encoding
    many conversations reuses it.
    """

    def __init__(self, adapter: FamilyAdapter, *, max_length: int | None) -> None:
        self.adapter = adapter
        self.max_length = max_length
        self._stops = frozenset(adapter.stop_token_ids)
        self._never = frozenset(adapter.banned_token_ids)
        self._newlines: dict[int, bool] = {}

    @classmethod
    def for_model(cls, model: Any, processor: Any, *, max_length: int | None = None) -> Encoder:
        """The encoder of ``model``'s family; ``max_length`` defaults to its context."""
        from idefics_kit.loading import adapter_class

        config = model.config
        adapter = adapter_class(str(config.model_type), type(model).__name__)(
            processor, model.generation_config
        )
        if max_length is None:
            limit = getattr(config.get_text_config(), "max_position_embeddings", None)
            max_length = int(limit) if isinstance(limit, int) else None
        return cls(adapter, max_length=max_length)

    def encode(
        self, conversation: Conversation, images: LoadedImages | None = None
    ) -> dict[str, torch.Tensor]:
        """The training example of ``conversation``; see :func:`encode_for_training`."""
        if not isinstance(conversation, Conversation):
            raise ConversationError(
                f"expected a Conversation, got {type(conversation).__name__}; "
                "build one with Conversation().user(...).assistant(...)"
            )
        targets = assistant_turns(conversation)
        if not targets:
            raise ConversationError(
                "conversation has no assistant turn, so nothing to learn: add the answer "
                "with .assistant(...) (assistant turns are the training targets)"
            )
        if conversation.turns[0].role != "user":
            raise ConversationError(
                "conversation starts with an assistant turn; a training conversation "
                "starts with a user turn (after an optional system prompt)"
            )
        self.adapter.check(conversation)
        if images is None:
            images = [part.load() for part in conversation.images()]
        full = self._render(conversation, images, generation_prompt=False)
        ids: list[int] = full["input_ids"][0].tolist()
        if self.max_length is not None and len(ids) > self.max_length:
            raise ConversationError(
                f"the conversation is {len(ids)} tokens (images included) but at most "
                f"{self.max_length} fit (the model's context, or max_length); it is refused, "
                "never cut (a cut could split an image's tokens): shorten it, use fewer or "
                "smaller images, or split it into several conversations"
            )
        labels = [IGNORE_INDEX] * len(ids)
        for turn in targets:
            span = self._span(conversation, images, turn, ids)
            image = self._image_positions(ids, span)
            for position in range(span.start, span.end):
                if position not in image:
                    labels[position] = ids[position]
        example: dict[str, torch.Tensor] = {}
        for key, value in full.items():
            if not isinstance(value, torch.Tensor):
                continue
            # One conversation: drop the batch dimension of every input.
            example[key] = value[0]
        if "image_attention_mask" in example:
            example["image_attention_mask"] = example["image_attention_mask"].long()
        example["labels"] = torch.tensor(labels, dtype=torch.long)
        return example

    def _image_positions(self, ids: Sequence[int], span: _Span) -> set[int]:
        """Positions in ``span`` that belong to an image's expansion.

        Image, tile and boundary tokens, and the newlines IDEFICS 3 and SmolVLM
        put between an image's rows of tiles (a newline counts only between two
        image tokens, so text around an image keeps its own).
        """
        found: set[int] = set()
        last_image: int | None = None
        for position in range(span.start, span.end):
            token = ids[position]
            if token in self._never:
                if last_image is not None:
                    found.update(range(last_image + 1, position))
                found.add(position)
                last_image = position
            elif not self._is_newline(token):
                last_image = None
        return found

    def _is_newline(self, token: int) -> bool:
        known = self._newlines.get(token)
        if known is None:
            text = self.adapter.tokenizer.decode([token])
            known = self._newlines[token] = bool(text) and not text.strip() and "\n" in text
        return known

    def _span(
        self, conversation: Conversation, images: LoadedImages, turn: int, full: Sequence[int]
    ) -> _Span:
        before = self._prefix_ids(conversation, images, turn, generation_prompt=True)
        through = (
            list(full)
            if turn == len(conversation.turns) - 1
            else self._prefix_ids(conversation, images, turn + 1, generation_prompt=False)
        )
        family = self.adapter.family
        if list(full[: len(through)]) != through or through[: len(before)] != before:
            raise TrainingError(
                f"the {family} chat template or tokenizer does not render assistant turn "
                f"{turn} (0-based) as a continuation of the prompt before it: the token ids "
                "of the shorter rendering are not a prefix of the longer one (tokens merged "
                "across the turn boundary), so the labels cannot be placed exactly. Change "
                "the text at that boundary (e.g. strip leading whitespace from the answer)"
            )
        start, end = len(before), len(through)
        for position in range(start, end):
            if full[position] in self._stops:
                return _Span(start=start, end=position + 1)
        raise TrainingError(
            f"the {family} rendering of assistant turn {turn} (0-based) has no end-of-turn "
            f"token (one of the stop ids {sorted(self._stops)}); training on it would teach "
            "the model to never stop. Fix the chat template so assistant turns end with "
            "<end_of_utterance> or the eos token"
        )

    def _prefix_ids(
        self,
        conversation: Conversation,
        images: LoadedImages,
        turns: int,
        *,
        generation_prompt: bool,
    ) -> list[int]:
        head = Conversation(system=conversation.system, turns=conversation.turns[:turns])
        count = len(head.images())
        rendered = self._render(head, images[:count], generation_prompt=generation_prompt)
        ids: list[int] = rendered["input_ids"][0].tolist()
        return ids

    def _render(
        self, conversation: Conversation, images: LoadedImages, *, generation_prompt: bool
    ) -> Any:
        try:
            return self.adapter.render(
                conversation, images, add_generation_prompt=generation_prompt
            )
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:
            raise ConversationError(
                f"the {self.adapter.family} processor could not encode this conversation: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def answer_text(conversation: Conversation) -> str:
    """The text of the conversation's last turn (an assistant turn): the expected answer."""
    return "".join(p.text for p in conversation.turns[-1].parts if isinstance(p, TextPart))


def encode_for_training(
    gen: Generator, conversation: Conversation, *, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """One conversation as a training example for ``gen``'s model.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (1-D, one
    conversation, no batch dimension) and the model inputs of its images
    (``pixel_values`` and ``pixel_attention_mask`` for IDEFICS 2/3 and
    SmolVLM, one row per image tile; ``pixel_values`` and the per-token
    ``image_attention_mask`` for IDEFICS 1). ``labels`` equal ``input_ids`` on
    the tokens of every assistant turn, each turn's end-of-turn token included,
    and are -100 everywhere else (BOS, system and user text, image and tile
    tokens, the ``Assistant:`` prompt). See the module docstring for how.

    A conversation longer than ``max_length`` (default: the model's context)
    raises :class:`~idefics_kit.ConversationError`; it is never cut. So does
    one without an assistant turn.
    """
    per_length = _ENCODERS.setdefault(gen, {})
    encoder = per_length.get(max_length)
    if encoder is None:
        encoder = per_length[max_length] = Encoder.for_model(
            gen.model, gen.processor, max_length=max_length
        )
    return encoder.encode(conversation)


# One encoder per Generator (and length limit): building one scans the vocabulary.
_ENCODERS: weakref.WeakKeyDictionary[Generator, dict[int | None, Encoder]] = (
    weakref.WeakKeyDictionary()
)


def sequence_keys() -> tuple[str, ...]:
    """The example keys aligned with the tokens (padded along their first dimension)."""
    return (*_SEQUENCE_KEYS, "labels")
