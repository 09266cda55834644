"""Micro-batch planning and collation of per-conversation encodings.

Each conversation is encoded on its own (so a bad one fails alone, its exact
prompt length is known before the model runs, and encoding can overlap model
work). A micro-batch is then built by padding those encodings together the
way the processors do: sequences on the left, images with zeros at the end of
every other dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["collate", "plan", "prefill_parts"]


def plan(lengths: Sequence[int], groups: Sequence[object], batch_size: int) -> list[list[int]]:
    """Indices grouped into micro-batches of similar prompt length.

    Items of different ``groups`` (e.g. with and without images, whose model
    inputs have different keys) never share a micro-batch. Within a group,
    items are sorted by length so that each micro-batch pads little.
    """
    order = sorted(range(len(lengths)), key=lambda i: (repr(groups[i]), lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and groups[last[0]] == groups[index]:
            last.append(index)
        else:
            batches.append([index])
    return batches


MAX_PREFILL_PARTS = 4
PREFILL_PART_COST = 0.0625
"""What one more prefill part must save, as a share of the batch's real prompt tokens."""
_MAX_CUTS = 64
"""Where parts may end: the split is exact up to this many distinct lengths."""


def prefill_parts(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of one micro-batch split into parts of similar prompt length.

    A micro-batch whose prompts differ a lot in length pads the short ones up
    to the longest, and the prefill computes every padding position. Running
    the prefill in parts pads less; each extra part is one more forward pass,
    so a split must save more than :data:`PREFILL_PART_COST` of the real
    tokens. The split is the cheapest by padded tokens, at most
    :data:`MAX_PREFILL_PARTS` runs of the sorted lengths (dynamic programming;
    exact up to 64 distinct lengths, beyond that parts end on every n-th one).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    ordered = [lengths[i] for i in order]
    count = len(order)
    if count == 0:
        return []
    # A part never ends between two equal lengths: that cannot pad less.
    ends = [i for i in range(1, count) if ordered[i] != ordered[i - 1]]
    if len(ends) >= _MAX_CUTS:
        ends = ends[:: -(-len(ends) // _MAX_CUTS)]
    marks = [0, *ends, count]
    penalty = PREFILL_PART_COST * sum(ordered)
    # cost[k][m]: the rows before marks[m] in k parts, the last ending there.
    infinite = float("inf")
    cost = [[infinite] * len(marks) for _ in range(MAX_PREFILL_PARTS + 1)]
    start = [[0] * len(marks) for _ in range(MAX_PREFILL_PARTS + 1)]
    cost[0][0] = 0.0
    for parts in range(1, MAX_PREFILL_PARTS + 1):
        for end in range(parts, len(marks)):
            longest = ordered[marks[end] - 1]
            for begin in range(parts - 1, end):
                total = cost[parts - 1][begin] + (marks[end] - marks[begin]) * longest + penalty
                if total < cost[parts][end]:
                    cost[parts][end], start[parts][end] = total, begin
    last = len(marks) - 1
    best = min(range(1, min(MAX_PREFILL_PARTS, last) + 1), key=lambda k: cost[k][last])
    split: list[list[int]] = []
    end = last
    for parts in range(best, 0, -1):
        begin = start[parts][end]
        split.append(order[marks[begin] : marks[end]])
        end = begin
    return split[::-1]


def collate(
    encodings: Sequence[Mapping[str, torch.Tensor]],
    sequence_keys: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """Stack single-conversation encodings (batch dimension 1) into one batch.

    ``sequence_keys`` maps the keys aligned with the token sequence to their
    padding value; those are padded on the left along dimension 1. Every other
    dimension of every tensor is padded with zeros at its end.
    """
    if len(encodings) == 1:
        return dict(encodings[0])
    batch: dict[str, torch.Tensor] = {}
    for key in encodings[0]:
        tensors = [encoding[key] for encoding in encodings]
        shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        value = sequence_keys.get(key)
        padded = [_pad(t, shape, left=value is not None, value=value or 0) for t in tensors]
        batch[key] = torch.cat(padded, dim=0)
    return batch


def _pad(tensor: torch.Tensor, shape: list[int], *, left: bool, value: int) -> torch.Tensor:
    # F.pad takes (before, after) pairs from the last dimension backwards.
    pads: list[int] = []
    for dim in reversed(range(1, tensor.dim())):
        missing = shape[dim] - tensor.shape[dim]
        pads += [missing, 0] if left and dim == 1 else [0, missing]
    if not any(pads):
        return tensor
    return F.pad(tensor, pads, value=value)


def encoding_group(encoding: Mapping[str, Any]) -> tuple[str, ...]:
    """Items whose encodings have the same keys can share a micro-batch."""
    return tuple(sorted(encoding))
