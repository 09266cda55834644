"""The defaults of ``finetune()`` and ``idefics-kit finetune`` (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULTS", "Defaults"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Defaults:
    """Training settings used when a call or the command does not give them."""

    epochs: float = 3.0
    learning_rate_lora: float = 2e-4
    learning_rate_full: float = 1e-5
    small_model_parameters: int = 100_000_000
    """Below this many parameters (the toy and tiny test models) the small-model rates apply."""
    learning_rate_lora_small: float = 3e-3
    learning_rate_full_small: float = 1e-3
    batch_size: int = 8
    gradient_accumulation: int = 1
    lora_rank: int = 16
    save_steps: int = 100
    seed: int = 0


DEFAULTS = Defaults()
"""Tuned so that the toy example (docs/finetuning.md) learns in under a minute on 2 cores."""
