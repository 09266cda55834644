"""Short quotes of received values, for error messages.

Messages name the value they refuse, but a value from a client can be
megabytes (a 10,000-item ``stop`` list, 200,000 ``logit_bias`` keys): an
error must never echo it whole. :func:`short_repr` builds at most a bounded
``repr`` (``reprlib`` stops early, so the work is bounded too) and cuts it to
a prefix.
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Mapping

__all__ = ["QUOTE_CHARS", "short_repr"]

QUOTE_CHARS = 100
"""Characters of a received value that an error message quotes at most."""

_REPR = reprlib.Repr()
_REPR.maxstring = QUOTE_CHARS + 10
_REPR.maxother = QUOTE_CHARS + 10
_REPR.maxlong = QUOTE_CHARS + 10
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 12)
_REPR.maxlevel = 3


def short_repr(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, or its first ``limit`` characters followed by ``...``."""
    if isinstance(value, Mapping):
        # reprlib sorts a whole dict before cutting it; take the first items instead.
        head = dict(itertools.islice(value.items(), 13))
        text = _REPR.repr(head)
        if len(value) > len(head):
            text = text.rstrip("}") + ", ...}"
    else:
        try:
            text = _REPR.repr(value)
        except ValueError:  # an int too long to convert to decimal
            text = f"<{type(value).__name__} too long to print>"
    if len(text) > limit:
        return text[:limit] + "..."
    return text
