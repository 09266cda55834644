"""The running batch's state on the model: a left-padded KV cache that rows join and leave.

Rows of the batch are left-padded to one length, as the processors pad a
batch: every row's real tokens end at the last column, so one decoding step
feeds one new token per row. A row that joins (its prompt prefilled on its
own or with other new rows) is padded on the left to the batch's length, or
the batch to its; a row that leaves is dropped from every tensor, and the
columns that are padding for every remaining row are cut off the left.

The cache's layers keep spare columns (:data:`ROOM`) after the last one, so
a decoding step writes its new keys and values in place: ``DynamicCache``
grows by ``torch.cat`` at every step, which copies the whole cache into a
fresh allocation (on the CPU, 40% of a 16-row step of the small test
models). Joins and selections copy the cache anyway; they keep the room.
A prefilled state gets its buffers at its first join or step, whichever
comes first, so the cache of a row that joins is copied once.
The keys and values a layer hands to attention are views of its buffers:
the same numbers in the same order, so the tokens do not change.

Besides the cache, the state holds what each decoding step needs per row:
the attention mask (0 on padding), the next position id (the row's count of
real tokens: what ``generate`` derives from the mask) and the family's own
decode inputs (``FamilyAdapter.decode_inputs``; for IDEFICS 1 the image
encoder states and the image attention mask its cross-attention reads at
every step). Those are padded with zeros on the right of every non-batch
dimension when rows join: a zero image-mask entry is never attended to.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["ROOM", "BatchCache", "joinable"]

ROOM = 64
"""Spare columns a layer keeps after its last one: a reallocation every ``ROOM`` steps at most."""


def joinable(model: Any, length: int) -> bool:
    """Whether caches of sequences up to ``length`` tokens can be joined and cut.

    Plain layers keep every position; sliding-window layers keep every one
    until the window fills, and a window shorter than ``length`` would already
    have dropped some.
    """
    # Asked for every request the scheduler admits: the limit is worked out
    # once per model (building a cache's layers costs about 0.15 ms).
    limit = _JOIN_LIMITS.get(model)
    if limit is None:
        limit = _JOIN_LIMITS[model] = _join_limit(model)
    return length < limit


_JOIN_LIMITS: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _join_limit(model: Any) -> float:
    """The shortest sliding window of ``model``'s cache layers (inf: none; 0: a kind never joined)."""
    limit = math.inf
    for layer in DynamicCache(config=model.config.get_text_config(decoder=True)).layers:
        if type(layer) is not DynamicLayer:
            window = getattr(layer, "sliding_window", None)
            if not isinstance(window, int):
                return 0.0
            limit = min(limit, window)
    return limit


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
        self._grown = False
        """Whether the layers were made growing: at the first join or step, whichever comes
        first (a prefilled state that is joined into the batch is copied only once)."""

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def step_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """The model inputs that feed ``tokens`` (one per row) on top of the cache."""
        if not self._grown:
            self._grow()
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
            for index, (mine, theirs) in enumerate(
                zip(self.cache.layers, other.cache.layers, strict=True)
            ):
                if not isinstance(mine, _Growing):
                    # Made growing by this join's one copy, not by a copy of its own first.
                    grown = _growing(mine)
                    if grown is not None:
                        self.cache.layers[index] = mine = grown
                if isinstance(mine, _Growing):
                    mine.join(theirs.keys, theirs.values, length)
                else:
                    mine.keys = _stacked(mine.keys, theirs.keys, length)
                    mine.values = _stacked(mine.values, theirs.values, length)
                    _resync(mine)
                theirs.keys = theirs.values = None  # released as soon as joined
            self.mask = torch.cat(
                [_left_padded_mask(self.mask, length), _left_padded_mask(other.mask, length)]
            )
            self.positions = torch.cat([self.positions, other.positions])
            self.extras = {
                key: _joined_extra(self.extras[key], other.extras[key]) for key in self.extras
            }
        self._grown = True

    def _grow(self) -> None:
        """Swap the prefilled layers for growing ones (one copy of each, with room)."""
        with torch.inference_mode():
            for index, layer in enumerate(self.cache.layers):
                grown = _growing(layer)
                if grown is not None:
                    grown.hold(grown.keys, grown.values)
                    self.cache.layers[index] = grown
        self._grown = True

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
            if isinstance(layer, _Growing) and not layer.full:
                layer.select(where, start)
            else:
                layer.keys = layer.keys.index_select(0, where)[:, :, start:]
                layer.values = layer.values.index_select(0, where)[:, :, start:]
                _resync(layer)
        self.extras = {
            key: value.index_select(0, index.to(value.device)) for key, value in self.extras.items()
        }


class _Growing:
    """A cache layer whose keys and values are views of buffers with room to grow.

    ``keys``/``values`` are ``buffer[:, :, start:end]``; a step writes the
    new column at ``end``. Mixed into transformers' layer classes, so the
    model sees the layer it expects (the sliding one's mask sizes included).
    """

    keys: torch.Tensor
    values: torch.Tensor
    _key_buffer: torch.Tensor
    _value_buffer: torch.Tensor
    _start: int
    _end: int
    full = False
    """True once a sliding window filled: transformers' own update holds the columns since."""

    def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take ``keys``/``values`` (``[rows, heads, columns, dim]``) into new buffers with room."""
        columns = int(keys.shape[-2])
        self._key_buffer = _with_room(keys)
        self._value_buffer = _with_room(values)
        self._start, self._end = 0, columns
        self._expose()

    def join(self, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
        """Append rows (``keys``/``values``), both sides left-padded with zeros to ``columns``."""
        self._key_buffer = _stacked_with_room(self.keys, keys, columns)
        self._value_buffer = _stacked_with_room(self.values, values, columns)
        self._start, self._end = 0, columns
        self._expose()

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep the buffer rows ``rows`` and the columns from ``start`` on (room included)."""
        self._key_buffer = self._key_buffer.index_select(0, rows)
        self._value_buffer = self._value_buffer.index_select(0, rows)
        self._start += start
        self._expose()

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        added = int(key_states.shape[-2])
        if self._end + added > self._key_buffer.shape[-2]:
            self.hold(self.keys, self.values)  # out of room: move to new buffers
        end = self._end + added
        self._key_buffer[:, :, self._end : end] = key_states
        self._value_buffer[:, :, self._end : end] = value_states
        self._end = end
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_buffer[:, :, self._start : self._end]
        self.values = self._value_buffer[:, :, self._start : self._end]
        if hasattr(self, "cumulative_length"):
            self.cumulative_length = self._end - self._start


class _GrowingLayer(_Growing, DynamicLayer):  # type: ignore[misc]
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(key_states, value_states)
        return self.keys, self.values


class _GrowingSlidingLayer(_Growing, DynamicSlidingWindowLayer):  # type: ignore[misc]
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full or self.cumulative_length + int(key_states.shape[-2]) >= self.sliding_window:
            # The window fills (only a row running alone gets here: ``joinable``):
            # transformers' own update drops the oldest columns from now on.
            self.full = True
            return super().update(key_states, value_states, *args, **kwargs)  # type: ignore[no-any-return]
        self.write(key_states, value_states)
        return self.keys, self.values


def _growing(layer: Any) -> _Growing | None:
    """A growing layer holding ``layer``'s keys and values as they are (no buffer yet, no copy).

    None for kinds of layers that stay as they are. The caller gives it buffers
    (``hold`` or ``join``) before it is updated.
    """
    grown: _Growing
    if type(layer) is DynamicLayer:
        grown = _GrowingLayer()
    elif type(layer) is DynamicSlidingWindowLayer and not layer.record_past:
        grown = _GrowingSlidingLayer(sliding_window=layer.sliding_window)
    else:
        return None
    if not layer.is_initialized:
        return None
    grown.device = layer.device
    grown.is_initialized = True
    if isinstance(grown, DynamicSlidingWindowLayer):
        grown._sliding_window_tensor = layer._sliding_window_tensor
    grown.keys, grown.values = layer.keys, layer.values
    if isinstance(grown, DynamicSlidingWindowLayer):
        grown.cumulative_length = layer.cumulative_length
    return grown


def _with_room(tensor: torch.Tensor) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[-2] += ROOM
    # Never read beyond the held columns, so left uninitialised.
    buffer = tensor.new_empty(shape)
    buffer[:, :, : tensor.shape[-2]] = tensor
    return buffer


def _stacked_with_room(mine: torch.Tensor, theirs: torch.Tensor, columns: int) -> torch.Tensor:
    rows = int(mine.shape[0])
    shape = [rows + int(theirs.shape[0]), *mine.shape[1:]]
    shape[-2] = columns + ROOM
    buffer = mine.new_empty(shape)
    for part, at in ((mine, slice(0, rows)), (theirs, slice(rows, None))):
        # Left padding is attended to with weight 0, and must be finite
        # for that: zeros, never uninitialised memory.
        pad = columns - int(part.shape[-2])
        buffer[at, :, :pad] = 0
        buffer[at, :, pad:columns] = part
    return buffer


def _stacked(mine: torch.Tensor, theirs: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([_left_padded(mine, length), _left_padded(theirs, length)])


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
