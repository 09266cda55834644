"""Batches of training examples: padding for transformers' ``Trainer`` and TRL.

Training pads on the **right** by default (generation pads on the left): the
labels of padding are -100 and its attention mask 0, so each row's loss is
exactly its unpadded loss, and right padding keeps every row's positions
starting at 0 without position ids. ``padding_side="left"`` is there for
setups that want it; the loss is the same.

Image inputs are padded as the processors pad a batch: a row with fewer
images (or tiles) gets all-zero ones, which the IDEFICS 2/3 and SmolVLM
models drop and which IDEFICS 1's per-token ``image_attention_mask`` (padded
with zeros in both of its dimensions) never lets a token see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from idefics_kit.errors import InvalidParameterError
from idefics_kit.finetune.labels import IGNORE_INDEX

__all__ = ["PaddingSide", "TrainingCollator"]

PaddingSide = Literal["right", "left"]

_PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX}


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingCollator:
    """Stack :func:`~idefics_kit.finetune.encode_for_training` examples into a batch.

    ``pad_token_id`` fills ``input_ids`` (use the tokenizer's pad id; the
    value never matters for the loss since its labels are -100 and its
    attention 0). Pass it as ``data_collator=`` to ``Trainer`` or TRL's
    ``SFTTrainer`` (with already-encoded examples, and
    ``remove_unused_columns=False`` so the image inputs reach the model).
    """

    pad_token_id: int
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise InvalidParameterError(
                "padding_side",
                f"padding_side must be 'right' or 'left', got {self.padding_side!r}",
                self.padding_side,
            )

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise InvalidParameterError("examples", "cannot collate an empty batch", examples)
        keys = set(examples[0])
        for index, example in enumerate(examples):
            if set(example) - {"pixel_values", "pixel_attention_mask"} != keys - {
                "pixel_values",
                "pixel_attention_mask",
            }:
                raise InvalidParameterError(
                    "examples",
                    f"example {index} has keys {sorted(example)}, example 0 has "
                    f"{sorted(keys)}: every example must come from the same model's encoder",
                    None,
                )
        length = max(int(e["input_ids"].shape[0]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "labels"):
            value = self.pad_token_id if key == "input_ids" else _PAD_VALUES[key]
            batch[key] = torch.stack([self._pad_sequence(e[key], length, value) for e in examples])
        if "image_attention_mask" in keys:
            # (batch, tokens, images): rows with fewer images see none of the padding ones.
            batch["image_attention_mask"] = _stack_zero_padded(
                [self._pad_sequence(e["image_attention_mask"], length, 0) for e in examples]
            )
        for key in ("pixel_values", "pixel_attention_mask"):
            present = [e[key] for e in examples if key in e]
            if not present:
                continue
            like = present[0]
            rows = [e[key] if key in e else like.new_zeros((0, *like.shape[1:])) for e in examples]
            batch[key] = _stack_zero_padded(rows)
        return batch

    def _pad_sequence(self, tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
        missing = length - int(tensor.shape[0])
        if not missing:
            return tensor
        pad = tensor.new_full((missing, *tensor.shape[1:]), value)
        return torch.cat([tensor, pad] if self.padding_side == "right" else [pad, tensor])

    def __repr__(self) -> str:
        return (
            f"TrainingCollator(pad_token_id={self.pad_token_id}, "
            f"padding_side={self.padding_side!r})"
        )


def _stack_zero_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack, padding every dimension with zeros at its end."""
    shape = [max(int(t.shape[d]) for t in tensors) for d in range(tensors[0].dim())]
    padded = []
    for tensor in tensors:
        pads: list[int] = []
        for dim in reversed(range(tensor.dim())):
            pads += [0, shape[dim] - int(tensor.shape[dim])]
        padded.append(torch.nn.functional.pad(tensor, pads) if any(pads) else tensor)
    return torch.stack(padded)
