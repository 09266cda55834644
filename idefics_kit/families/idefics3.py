"""IDEFICS 3 (``Idefics3ForConditionalGeneration``, e.g. HuggingFaceM4/Idefics3-8B-Llama3).

The chat template starts with ``<|begin_of_text|>`` and so does the Llama-3
tokenizer: the processor sees the template's BOS and does not add a second.
Images are split into tiles, each tagged ``<row_i_col_j>``, plus a
``<global-img>`` view; none of those tags may be generated. The published
generation config lists only the Llama-3 eos ids, so ``<end_of_utterance>``
is added to the stop ids by the base adapter.
"""

from __future__ import annotations

from typing import Any

from idefics_kit.families.base import ChatTemplateAdapter, Pixels

__all__ = ["TILE_TOKENS", "Idefics3Adapter", "count_tiles"]

TILE_TOKENS = (
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)


def count_tiles(adapter: ChatTemplateAdapter, encoded: Any) -> list[int]:
    """Pixel tiles of each image, read from the prompt's tile tags.

    An image is its ``<row_i_col_j>`` tiles (none when it is not split) and
    then its ``<global-img>`` view, in the same order as its pixel tiles.
    """
    vocab = adapter.tokenizer.get_vocab()
    global_id = vocab["<global-img>"]
    tile_ids = {vocab[t] for t in TILE_TOKENS[1:] if t in vocab}
    counts: list[int] = []
    tiles = 0
    for token in encoded["input_ids"][0].tolist():
        if token in tile_ids:
            tiles += 1
        elif token == global_id:
            counts.append(tiles + 1)
            tiles = 0
    return counts


class Idefics3Adapter(ChatTemplateAdapter):
    """IDEFICS 3: the model's own chat template; tile tags banned."""

    family = "idefics3"
    model_type = "idefics3"
    banned_tokens = (*ChatTemplateAdapter.banned_tokens, *TILE_TOKENS)

    def split_pixels(self, encoded: Any, count: int) -> list[Pixels]:
        tiles = count_tiles(self, encoded)
        if len(tiles) != count:
            raise ValueError(f"{len(tiles)} <global-img> views for {count} images")
        return self._slices(encoded, tiles)
