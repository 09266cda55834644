"""IDEFICS 3 (``Idefics3ForConditionalGeneration``, e.g. HuggingFaceM4/Idefics3-8B-Llama3).

The chat template starts with ``<|begin_of_text|>`` and so does the Llama-3
tokenizer: the processor sees the template's BOS and does not add a second.
Images are split into tiles, each tagged ``<row_i_col_j>``, plus a
``<global-img>`` view; none of those tags may be generated. The published
generation config lists only the Llama-3 eos ids, so ``<end_of_utterance>``
is added to the stop ids by the base adapter.
"""

from __future__ import annotations

from idefics_kit.families.base import ChatTemplateAdapter

__all__ = ["TILE_TOKENS", "Idefics3Adapter"]

TILE_TOKENS = (
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)


class Idefics3Adapter(ChatTemplateAdapter):
    """IDEFICS 3: the model's own chat template; tile tags banned."""

    family = "idefics3"
    model_type = "idefics3"
    banned_tokens = (*ChatTemplateAdapter.banned_tokens, *TILE_TOKENS)
