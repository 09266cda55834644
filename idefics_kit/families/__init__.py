"""One adapter per model family, looked up by ``config.model_type``.

Adding a family means adding its module here and to ``ADAPTERS``.
"""

from __future__ import annotations

from idefics_kit.families.base import Family, FamilyAdapter
from idefics_kit.families.idefics import IdeficsAdapter
from idefics_kit.families.idefics2 import Idefics2Adapter
from idefics_kit.families.idefics3 import Idefics3Adapter
from idefics_kit.families.smolvlm import SmolVLMAdapter

__all__ = ["ADAPTERS", "Family", "FamilyAdapter", "adapter_for"]

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    cls.model_type: cls
    for cls in (IdeficsAdapter, Idefics2Adapter, Idefics3Adapter, SmolVLMAdapter)
}


def adapter_for(model_type: str) -> type[FamilyAdapter] | None:
    """The adapter class for ``model_type``, or None when it is not supported."""
    return ADAPTERS.get(model_type)
