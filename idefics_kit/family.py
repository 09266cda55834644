"""The names of the supported model families (no heavy imports)."""

from __future__ import annotations

from typing import Literal

__all__ = ["Family"]

Family = Literal["idefics", "idefics2", "idefics3", "smolvlm"]
"""``Generator.family``: the ``config.model_type`` of a supported checkpoint."""
