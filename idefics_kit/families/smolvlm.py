"""SmolVLM (``SmolVLMForConditionalGeneration``, e.g. HuggingFaceTB/SmolVLM-Instruct).

Same image layout as IDEFICS 3 (tiles with ``<row_i_col_j>`` tags and a
``<global-img>`` view); the template starts with ``<|im_start|>`` and
``<end_of_utterance>`` is the checkpoint's eos. Its processor needs
``torchvision`` and ``num2words`` (``pip install idefics-kit[smolvlm]``).
"""

from __future__ import annotations

from typing import Any

from idefics_kit.families.base import ChatTemplateAdapter, Pixels
from idefics_kit.families.idefics3 import TILE_TOKENS, count_tiles

__all__ = ["SmolVLMAdapter"]


class SmolVLMAdapter(ChatTemplateAdapter):
    """SmolVLM: the model's own chat template; tile tags banned."""

    family = "smolvlm"
    model_type = "smolvlm"
    banned_tokens = (*ChatTemplateAdapter.banned_tokens, *TILE_TOKENS)

    def split_pixels(self, encoded: Any, count: int) -> list[Pixels]:
        tiles = count_tiles(self, encoded)
        if len(tiles) != count:
            raise ValueError(f"{len(tiles)} <global-img> views for {count} images")
        return self._slices(encoded, tiles)
