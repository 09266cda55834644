"""What every family adapter provides, and the parts most of them share.

An adapter is the only place that knows a family's prompt format and special
tokens. It turns conversations (with their images already decoded) into model
inputs, left-padded, and names the token ids that end an answer and those the
model must never generate. The engine does the rest, the same way for all.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from idefics_kit.conversation import Conversation, TextPart
from idefics_kit.errors import ConversationError
from idefics_kit.family import Family

__all__ = [
    "END_OF_UTTERANCE",
    "ChatTemplateAdapter",
    "Family",
    "FamilyAdapter",
    "LoadedImages",
    "Pixels",
]

LoadedImages = Sequence[Image.Image]
"""One conversation's decoded images, in order of appearance."""

Pixels = dict[str, torch.Tensor]
"""One image's share of a conversation's processed pixel inputs (``pixel_values`` ...)."""

END_OF_UTTERANCE = "<end_of_utterance>"
_IMAGE_TOKENS = ("<image>", "<fake_token_around_image>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class FamilyAdapter(ABC):
    """Prompt format and special tokens of one model family."""

    family: ClassVar[Family]
    model_type: ClassVar[str]
    """``config.model_type`` of the checkpoints this adapter serves."""
    banned_tokens: ClassVar[tuple[str, ...]] = _IMAGE_TOKENS
    """Tokens the model may never generate (only those in the vocabulary count)."""
    replaced_by_features: ClassVar[tuple[str, ...]] = ()
    """Model inputs that :meth:`with_image_features` drops: not worth batching then."""
    prefills_in_parts: ClassVar[bool] = False
    language_module_prefixes: ClassVar[tuple[str, ...]] = ("model.text_model.",)
    """Module names of the language model (LoRA targets when fine-tuning)."""
    """Whether a micro-batch's prefill may run in parts of similar length (``prefill``).

    True where images enter as token embeddings and the prompt's KV cache is
    all that decoding needs; IDEFICS 1's cross-attention also carries image
    state from step to step.
    """

    def __init__(self, processor: Any, generation_config: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        vocab: dict[str, int] = self.tokenizer.get_vocab()
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        own_eos = [eos] if isinstance(eos, int) else list(eos or ())
        # Idefics3-8B lists only its Llama-3 eos ids: <end_of_utterance> must be added.
        extra = [vocab[END_OF_UTTERANCE]] if END_OF_UTTERANCE in vocab else []
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*own_eos, *extra]))
        self.banned_token_ids: tuple[int, ...] = tuple(
            vocab[token] for token in self.banned_tokens if token in vocab
        )
        # SentencePiece byte-fallback pieces (Llama 2: <0x00> ... <0xFF>): a run
        # of them decodes as a whole, so its text is final only once it ends.
        self.byte_token_ids: frozenset[int] = frozenset(
            index for token, index in vocab.items() if _BYTE_PIECE.fullmatch(token)
        )
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else self.stop_token_ids[0]
        control = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        control.update(self.tokenizer.all_special_tokens)
        # Longest first, so "<row_1_col_10>"-like names win over their prefixes.
        ordered = sorted(control, key=len, reverse=True)
        self._control_tokens = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @property
    def sequence_keys(self) -> dict[str, int]:
        """Model inputs aligned with the tokens, and the value they are padded with."""
        return {"input_ids": self.pad_token_id, "attention_mask": 0}

    @abstractmethod
    def encode(self, conversations: Sequence[Conversation], images: Sequence[LoadedImages]) -> Any:
        """Return the left-padded model inputs (a ``BatchFeature``) for a batch."""

    @abstractmethod
    def render(
        self, conversation: Conversation, images: LoadedImages, *, add_generation_prompt: bool
    ) -> Any:
        """One conversation's model inputs (a ``BatchFeature``, batch of one, no padding).

        With ``add_generation_prompt`` it equals :meth:`encode` of that
        conversation alone (the prompt the model answers); without, the
        conversation ends after its last turn (how training sees it, see
        ``idefics_kit.finetune``).
        """

    @abstractmethod
    def split_pixels(self, encoded: Any, count: int) -> list[Pixels]:
        """Each of the ``count`` images' own pixel inputs in one conversation's encoding."""

    @abstractmethod
    def image_features(self, model: Any, pixels: Sequence[Pixels]) -> list[torch.Tensor]:
        """The vision encoder's output for each image (its ``split_pixels``), in one batch."""

    @abstractmethod
    def with_image_features(
        self, model: Any, inputs: dict[str, Any], features: list[list[torch.Tensor]]
    ) -> dict[str, Any]:
        """``inputs`` with the pixels replaced by precomputed per-image ``features``."""

    def image_box(self) -> tuple[tuple[int, int] | None, bool]:
        """The largest image the processor uses, and whether it keeps the aspect ratio.

        IDEFICS 2, 3 and SmolVLM resize so that the longest edge is at most
        ``size["longest_edge"]`` (keeping the aspect ratio; IDEFICS 3 and
        SmolVLM split tiles from that). ``(None, True)`` when the processor
        does not resize or says nothing readable.
        """
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None or getattr(image_processor, "do_resize", True) is False:
            return None, True
        size = getattr(image_processor, "size", None)
        # A dict in older transformers, a SizeDict (attributes) in 5.x.
        edge = (
            size.get("longest_edge")
            if isinstance(size, dict)
            else getattr(size, "longest_edge", None)
        )
        if isinstance(edge, int) and edge > 0:
            return (edge, edge), True
        return None, True

    def decode_inputs(self, inputs: Any, output: Any) -> dict[str, torch.Tensor]:
        """What each decoding step feeds the model besides the new tokens, batch dimension first.

        ``inputs`` are a prefill's model inputs and ``output`` its forward's
        output. Families whose images enter as token embeddings need nothing
        more than the KV cache.
        """
        return {}

    def check(self, conversation: Conversation) -> None:
        """Raise ``ConversationError`` for what this family cannot take.

        Text may not contain the tokenizer's control tokens (``<image>``,
        ``<end_of_utterance>``, ``<s>`` ...): they would be read as real
        tokens, letting user text add image slots or end a turn.
        """
        if self._control_tokens is None:
            return
        texts = [("the system prompt", conversation.system or "")]
        for turn_index, turn in enumerate(conversation.turns):
            texts += [
                (f"turn {turn_index} ({turn.role}), part {part_index}", part.text)
                for part_index, part in enumerate(turn.parts)
                if isinstance(part, TextPart)
            ]
        for where, text in texts:
            found = self._control_tokens.search(text)
            if found:
                raise ConversationError(
                    f"{where} contains the model's control token {found.group()!r}; text "
                    "cannot add image slots, end a turn or start a sequence. Remove it or "
                    f"write it differently (e.g. {found.group().replace('<', '< ')!r})"
                )

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens removed."""
        text: str = self.tokenizer.decode(
            list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text


class ChatTemplateAdapter(FamilyAdapter):
    """Families whose processor renders the model's own chat template."""

    replaced_by_features = ("pixel_values", "pixel_attention_mask")
    prefills_in_parts = True

    def encode(self, conversations: Sequence[Conversation], images: Sequence[LoadedImages]) -> Any:
        batch = [
            _chat_messages(conv, iter(imgs))
            for conv, imgs in zip(conversations, images, strict=True)
        ]
        return self.processor.apply_chat_template(
            batch,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )

    def render(
        self, conversation: Conversation, images: LoadedImages, *, add_generation_prompt: bool
    ) -> Any:
        return self.processor.apply_chat_template(
            [_chat_messages(conversation, iter(images))],
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )

    def split_pixels(self, encoded: Any, count: int) -> list[Pixels]:
        # Images are split into the same number of tiles each (one, or five with
        # IDEFICS 2's do_image_splitting); IDEFICS 3 and SmolVLM count theirs.
        tiles = int(encoded["pixel_values"].shape[1])
        if tiles % count:
            raise ValueError(f"{tiles} pixel tiles for {count} images")
        return self._slices(encoded, [tiles // count] * count)

    @staticmethod
    def _slices(encoded: Any, tiles: Sequence[int]) -> list[Pixels]:
        if sum(tiles) > int(encoded["pixel_values"].shape[1]):
            raise ValueError(
                f"{sum(tiles)} tiles expected, {encoded['pixel_values'].shape[1]} found"
            )
        pixels: list[Pixels] = []
        start = 0
        for count in tiles:
            pixels.append(
                {
                    "pixel_values": encoded["pixel_values"][0, start : start + count],
                    "pixel_attention_mask": encoded["pixel_attention_mask"][
                        0, start : start + count
                    ],
                }
            )
            start += count
        return pixels

    def image_features(self, model: Any, pixels: Sequence[Pixels]) -> list[torch.Tensor]:
        # One "conversation" per image, padded with all-zero tiles and images
        # as the processor pads a batch (the model drops those), so that
        # pooler_output comes back per image.
        values = _stack_padded([p["pixel_values"] for p in pixels])
        masks = _stack_padded([p["pixel_attention_mask"] for p in pixels])
        output = model.base_model.get_image_features(
            pixel_values=values.to(model.device, dtype=model.dtype),
            pixel_attention_mask=masks.to(model.device),
        )
        return list(output.pooler_output)

    def with_image_features(
        self, model: Any, inputs: dict[str, Any], features: list[list[torch.Tensor]]
    ) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # The same hook generate() itself uses once it has encoded the pixels.
        rest = {k: v for k, v in inputs.items() if k not in self.replaced_by_features}
        per_row = [torch.cat(row) for row in features]
        rest["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_row)}
        return rest


def _chat_messages(
    conversation: Conversation, images: Iterator[Image.Image]
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if conversation.system is not None:
        messages.append(
            {"role": "system", "content": [{"type": "text", "text": conversation.system}]}
        )
    for turn in conversation.turns:
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "image", "image": next(images)})
        messages.append({"role": turn.role, "content": content})
    return messages


def _stack_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack tensors into one batch, padding every dimension with zeros at its end."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    padded = []
    for tensor in tensors:
        pads: list[int] = []
        for dim in reversed(range(tensor.dim())):
            pads += [0, shape[dim] - tensor.shape[dim]]
        padded.append(torch.nn.functional.pad(tensor, pads) if any(pads) else tensor)
    return torch.stack(padded)
