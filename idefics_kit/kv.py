"""The running batch's state on the model: a left-padded KV cache that rows join and leave.

Rows of the batch are left-padded to one length, as the processors pad a
batch: every row's real tokens end at the last column, so one decoding step
feeds one new token per row. A row that joins (its prompt prefilled on its
own or with other new rows) is padded on the left to the batch's length, or
the batch to its; a row that leaves is dropped from every tensor, and the
columns that are padding for every remaining row are cut off the left.

Besides the cache, the state holds what each decoding step needs per row:
the attention mask (0 on padding), the next position id (the row's count of
real tokens: what ``generate`` derives from the mask) and the family's own
decode inputs (``FamilyAdapter.decode_inputs``; for IDEFICS 1 the image
encoder states and the image attention mask its cross-attention reads at
every step). Those are padded with zeros on the right of every non-batch
dimension when rows join: a zero image-mask entry is never attended to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["BatchCache", "joinable"]


def joinable(model: Any, length: int) -> bool:
    """Whether caches of sequences up to ``length`` tokens can be joined and cut.

    Plain layers keep every position; sliding-window layers keep every one
    until the window fills, and a window shorter than ``length`` would already
    have dropped some.
    """
    for layer in DynamicCache(config=model.config.get_text_config(decoder=True)).layers:
        if type(layer) is not DynamicLayer:
            window = getattr(layer, "sliding_window", None)
            if not isinstance(window, int) or length >= window:
                return False
    return True


class BatchCache:
    """KV cache, attention mask, positions and decode inputs of the running rows, in row order."""

    def __init__(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> None:
        self.cache = cache
        self.mask = mask
        """``[rows, columns]``: 1 on real tokens, 0 on left padding (what the cache holds)."""
        self.positions = positions
        """``[rows]``: the position id of each row's next token."""
        self.extras = extras
        self._next_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def step_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """The model inputs that feed ``tokens`` (one per row) on top of the cache."""
        mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        self._next_mask = mask
        return {
            "input_ids": tokens[:, None],
            "attention_mask": mask,
            "position_ids": self.positions[:, None],
            "cache": self.cache,
            **self.extras,
        }

    def stepped(self) -> None:
        """After a step: the cache grew by one column of real tokens."""
        mask = self._next_mask
        if mask is None:
            mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        self.mask, self._next_mask = mask, None
        self.positions = self.positions + 1

    def join(self, other: BatchCache) -> None:
        """Append ``other``'s rows after this batch's rows, padding the shorter on the left."""
        length = max(self.columns, other.columns)
        self._next_mask = None
        with torch.inference_mode():
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
                mine.keys = torch.cat(
                    [_left_padded(mine.keys, length), _left_padded(theirs.keys, length)]
                )
                mine.values = torch.cat(
                    [_left_padded(mine.values, length), _left_padded(theirs.values, length)]
                )
                theirs.keys = theirs.values = None  # released as soon as joined
                _resync(mine)
            self.mask = torch.cat(
                [_left_padded_mask(self.mask, length), _left_padded_mask(other.mask, length)]
            )
            self.positions = torch.cat([self.positions, other.positions])
            self.extras = {
                key: _joined_extra(self.extras[key], other.extras[key]) for key in self.extras
            }

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep`` (in that order); cut columns that became all padding."""
        self._next_mask = None
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(dim=0).nonzero()
        start = int(real[0, 0]) if real.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        for layer in self.cache.layers:
            where = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, where)[:, :, start:]
            layer.values = layer.values.index_select(0, where)[:, :, start:]
            _resync(layer)
        self.extras = {
            key: value.index_select(0, index.to(value.device)) for key, value in self.extras.items()
        }


def _resync(layer: Any) -> None:
    # Sliding-window layers count the positions they have seen; below the
    # window (``joinable``) that is exactly the columns they hold.
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = int(layer.keys.shape[-2])


def _left_padded(tensor: torch.Tensor, length: int) -> torch.Tensor:
    # [rows, heads, positions, head dim]: padding goes before the positions.
    missing = length - tensor.shape[-2]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor


def _left_padded_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return torch.nn.functional.pad(mask, (missing, 0)) if missing else mask


def _joined_extra(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` stacked on the batch dimension, zero-padded on the right of the others."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def grown(t: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for have, want in reversed(list(zip(t.shape[1:], shape, strict=True))):
            pads += [0, want - have]
        return torch.nn.functional.pad(t, pads) if any(pads) else t

    return torch.cat([grown(a), grown(b)])
