"""IDEFICS 1 (``IdeficsForVisionText2Text``, e.g. HuggingFaceM4/idefics-9b-instruct).

No chat template: the processor takes the interleaved list of the model card,
``["User: What is in this image?", <img>, "<end_of_utterance>", "\\nAssistant:"]``.
A turn's first text part follows its role label after one space, a text part
after an image stands alone; later turns start with ``"\\nUser:"`` or
``"\\nAssistant:"``. A system prompt becomes a first ``"System: ..."`` turn.
The processor strips spaces around each string, adds ``<s>``, and (since
transformers 5) no longer adds ``<end_of_utterance>`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import torch

from idefics_kit.conversation import Conversation, TextPart
from idefics_kit.errors import ConversationError
from idefics_kit.families.base import END_OF_UTTERANCE, FamilyAdapter, LoadedImages, Pixels

__all__ = ["IdeficsAdapter"]

_IMAGE = object()
"""Placeholder for an image in a prompt list before the images are decoded."""


class IdeficsAdapter(FamilyAdapter):
    """IDEFICS 1: the model card's interleaved prompt list."""

    # The decoder layers and the gated cross-attention that reads the images.
    language_module_prefixes = ("model.layers.", "model.gated_cross_attn_layers.")

    family = "idefics"
    model_type = "idefics"

    def __init__(self, processor: Any, generation_config: Any) -> None:
        super().__init__(processor, generation_config)
        self._padding: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def sequence_keys(self) -> dict[str, int]:
        # Which image each token may attend to (cross-attention), per token.
        return {**super().sequence_keys, "image_attention_mask": 0}

    def split_pixels(self, encoded: Any, count: int) -> list[Pixels]:
        return [{"pixel_values": encoded["pixel_values"][0, index]} for index in range(count)]

    def image_features(self, model: Any, pixels: Sequence[Pixels]) -> list[torch.Tensor]:
        stacked = torch.stack([p["pixel_values"] for p in pixels])
        return list(self._encode_pixels(model, stacked))

    def with_image_features(
        self, model: Any, inputs: dict[str, Any], features: list[list[torch.Tensor]]
    ) -> dict[str, Any]:
        # Rows with fewer images are padded with all-zero images, exactly as
        # the processor pads pixel_values; their output is masked anyway.
        slots = int(inputs["pixel_values"].shape[1])
        padding = []
        if any(len(row) < slots for row in features):
            padding = [self._padding_features(model, inputs["pixel_values"][0, :1])]
        rows = [torch.stack(row + padding * (slots - len(row))) for row in features]
        rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
        rest["image_encoder_embeddings"] = torch.stack(rows)
        return rest

    def image_box(self) -> tuple[tuple[int, int] | None, bool]:
        # IDEFICS 1 resizes every image to image_size x image_size.
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None or getattr(image_processor, "do_resize", True) is False:
            return None, True
        side = getattr(image_processor, "image_size", None)
        if isinstance(side, int) and side > 0:
            return (side, side), False
        return None, True

    def decode_inputs(self, inputs: Any, output: Any) -> dict[str, torch.Tensor]:
        # Cross-attention reads the images at every step: generate() feeds
        # the encoder states the prefill computed and the prompt's last row
        # of the image mask. Kept per row ([rows, images, ...]) so rows can
        # join and leave the batch with them.
        mask = inputs["image_attention_mask"]
        hidden = output.image_outputs.last_hidden_state
        return {
            "image_encoder_embeddings": hidden.reshape(
                int(mask.shape[0]), int(mask.shape[-1]), *hidden.shape[1:]
            ),
            "image_attention_mask": mask[:, -1:, :],
        }

    def _padding_features(self, model: Any, like: torch.Tensor) -> torch.Tensor:
        """The encoder output of an all-zero image, once per device and dtype.

        Computed in inference mode: a tensor kept for the adapter's lifetime
        must not hold an autograd graph.
        """
        key = (model.device, model.dtype)
        if key not in self._padding:
            with torch.inference_mode():
                self._padding[key] = self._encode_pixels(model, torch.zeros_like(like))[0]
        return self._padding[key]

    def _encode_pixels(self, model: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Vision encoder output, one row per image of ``pixels`` (N, 3, H, W)."""
        output = model.base_model.vision_model(
            pixel_values=pixels.to(model.device, dtype=model.dtype).contiguous()
        )
        features: torch.Tensor = output.last_hidden_state
        return features

    def check(self, conversation: Conversation) -> None:
        super().check(conversation)
        # The processor downloads any string item that parses as a bare URL.
        for item in _prompt_items(conversation):
            if isinstance(item, str) and _processor_takes_as_url(item):
                raise ConversationError(
                    f"text part {item.strip()!r} would be fetched as an image URL by the "
                    "IDEFICS 1 processor; pass images as ImagePart.from_url(...), or add words "
                    "around the URL so it stays text"
                )

    def encode(self, conversations: Sequence[Conversation], images: Sequence[LoadedImages]) -> Any:
        prompts = []
        for conversation, loaded in zip(conversations, images, strict=True):
            pending = iter(loaded)
            prompts.append(
                [next(pending) if item is _IMAGE else item for item in _prompt_items(conversation)]
            )
        return self.processor(
            text=prompts,
            add_end_of_utterance_token=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )

    def render(
        self, conversation: Conversation, images: LoadedImages, *, add_generation_prompt: bool
    ) -> Any:
        pending = iter(images)
        items = _prompt_items(conversation, generation_prompt=add_generation_prompt)
        prompt = [next(pending) if item is _IMAGE else item for item in items]
        return self.processor(text=[prompt], add_end_of_utterance_token=False, return_tensors="pt")


def _prompt_items(
    conversation: Conversation, *, generation_prompt: bool = True
) -> Iterator[object]:
    started = False
    turns: list[tuple[str, tuple[object, ...]]] = [
        (turn.role, turn.parts) for turn in conversation.turns
    ]
    if conversation.system is not None:
        turns.insert(0, ("system", (TextPart(text=conversation.system),)))
    for role, parts in turns:
        label = ("\n" if started else "") + role.capitalize() + ":"
        started = True
        first = True
        for part in _merge_text(parts):
            if isinstance(part, str):
                yield f"{label} {part}" if first else part
            else:
                if first:
                    yield label
                yield _IMAGE
            first = False
        yield END_OF_UTTERANCE
    if generation_prompt:
        yield "\nAssistant:"


def _merge_text(parts: Sequence[object]) -> Iterator[object]:
    # Adjacent text parts are one string, as the chat templates concatenate them.
    text: list[str] = []
    for part in parts:
        if isinstance(part, TextPart):
            text.append(part.text)
            continue
        if text:
            yield "".join(text)
            text = []
        yield part
    if text:
        yield "".join(text)


def _processor_takes_as_url(item: str) -> bool:
    # Mirrors transformers' idefics `is_url`, applied after `strip(" ")`.
    stripped = item.strip(" ")
    if " " in stripped:
        return False
    parsed = urlparse(stripped)
    return bool(parsed.scheme and parsed.netloc)
