"""Prefill one micro-batch in parts of similar length, then decode it as one.

Rows of very different prompt lengths pad the short ones up to the longest,
and the prefill computes every padding position (up to a third of the work
for requests that arrive together; ``benchmarks/diagnose_concurrency.py``).
Here each part's prompts, all but their last token, run through the model
on their own; their KV caches are left-padded to one length and joined in
the rows' order, and ``generate`` continues from that cache with the whole
batch: its first step feeds every row's last prompt token, so the logits
processors, streamers and stopping criteria see what they see without a cache.

Only for families whose images enter as token embeddings
(``FamilyAdapter.prefills_in_parts``): the prompt's last token is then text,
and the cache is all the state the decoding steps need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["joinable", "joined", "prefill"]


def joinable(model: Any, length: int) -> bool:
    """Whether prefill caches of prompts up to ``length`` tokens can be joined.

    Plain and sliding-window layers keep every position until the window
    fills; a window shorter than the prompt would already have dropped some.
    """
    for layer in DynamicCache(config=model.config.get_text_config(decoder=True)).layers:
        if type(layer) is not DynamicLayer:
            window = getattr(layer, "sliding_window", None)
            if not isinstance(window, int) or length >= window:
                return False
    return True


def prefill(model: Any, inputs: Mapping[str, Any]) -> DynamicCache:
    """The KV cache of ``inputs`` (one part, left-padded) without their last token."""
    mask = inputs["attention_mask"][:, :-1]
    # What generate() derives from the mask: positions count real tokens only.
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        model.base_model(
            input_ids=inputs["input_ids"][:, :-1],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **rest,
        )
    return cache


def joined(
    model: Any, caches: Sequence[DynamicCache], parts: Sequence[Sequence[int]], length: int
) -> DynamicCache:
    """One cache of ``length`` positions for all rows, in row order.

    ``parts[k]`` are the rows (positions in the micro-batch) of ``caches[k]``.
    The padding added on the left is masked by the batch's attention mask,
    like the padding the processors add. The parts' tensors are released
    layer by layer, so the join holds at most one layer twice.
    """
    order = [row for part in parts for row in part]
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    result = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.inference_mode():
        for index, layer in enumerate(result.layers):
            keys = _left_padded([cache.layers[index].keys for cache in caches], length)
            values = _left_padded([cache.layers[index].values for cache in caches], length)
            where = back.to(keys.device)
            layer.update(keys.index_select(0, where), values.index_select(0, where))
            del keys, values
            for cache in caches:
                cache.layers[index].keys = cache.layers[index].values = None
    return result


def _left_padded(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    # [rows, heads, positions, head dim]: padding goes before the positions.
    return torch.cat(
        [torch.nn.functional.pad(t, (0, 0, length - t.shape[-2], 0)) for t in tensors], dim=0
    )
