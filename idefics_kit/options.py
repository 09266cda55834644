"""Generation options, validated once when constructed."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from idefics_kit.errors import InvalidParameterError

__all__ = ["GenerationOptions"]

_MAX_STOP_STRINGS = 16
_MAX_SEED = 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationOptions:
    """How to decode an answer.

    ``temperature == 0.0`` (the default) means greedy decoding; any positive
    temperature samples with ``top_p``/``top_k``. ``top_k=None`` disables
    top-k filtering and ``top_p=1.0`` disables nucleus filtering.
    ``stop`` holds strings that end the answer (the text is cut before them).
    ``seed`` makes sampling reproducible. A bad value raises
    :class:`~idefics_kit.InvalidParameterError` naming the parameter, the
    allowed range and the value received.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            _fail("max_new_tokens", "must be an int >= 1", self.max_new_tokens)
        if not _is_number(self.temperature) or self.temperature < 0:
            _fail("temperature", "must be a finite number >= 0 (0 means greedy)", self.temperature)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", "must be a number in (0, 1]", self.top_p)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            _fail("top_k", "must be None or an int >= 1", self.top_k)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            _fail("repetition_penalty", "must be a finite number > 0", self.repetition_penalty)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            _fail("seed", f"must be None or an int in [0, {_MAX_SEED}]", self.seed)
        object.__setattr__(self, "stop", _narrow_stop(self.stop))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0.0

    def with_overrides(self, overrides: Mapping[str, Any]) -> GenerationOptions:
        """Return a copy with ``overrides`` applied; unknown names raise."""
        if not overrides:
            return self
        allowed = [f.name for f in dataclasses.fields(self)]
        for name in overrides:
            if name not in allowed:
                raise InvalidParameterError(
                    name,
                    f"unknown generation option {name!r}; allowed: {', '.join(allowed)}",
                    overrides[name],
                )
        return dataclasses.replace(self, **overrides)


def _fail(name: str, rule: str, value: object) -> NoReturn:
    raise InvalidParameterError(name, f"{name} {rule}, got {value!r}", value)


def _narrow_stop(stop: object) -> tuple[str, ...]:
    # Accept the shapes people pass by habit (one string, a list) and store one.
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (tuple, list)):
        _fail("stop", "must be a string or a sequence of strings", stop)
    if len(items) > _MAX_STOP_STRINGS:
        _fail("stop", f"must hold at most {_MAX_STOP_STRINGS} strings", stop)
    for item in items:
        if not isinstance(item, str) or not item:
            _fail("stop", "must hold only non-empty strings", stop)
    return tuple(dict.fromkeys(items))
