"""IDEFICS 2 (``Idefics2ForConditionalGeneration``, e.g. HuggingFaceM4/idefics2-8b).

The processor renders the checkpoint's chat template
(``User:<image>q<end_of_utterance>\\nAssistant:``); the tokenizer adds ``<s>``.
Each image becomes ``image_seq_len`` ``<image>`` tokens (the perceiver's
latents) between ``<fake_token_around_image>``.
"""

from __future__ import annotations

from idefics_kit.families.base import ChatTemplateAdapter

__all__ = ["Idefics2Adapter"]


class Idefics2Adapter(ChatTemplateAdapter):
    """IDEFICS 2: the model's own chat template."""

    family = "idefics2"
    model_type = "idefics2"
