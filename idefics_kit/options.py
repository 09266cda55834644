"""Generation options, validated once when constructed."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from idefics_kit._quote import short_repr
from idefics_kit.errors import InvalidParameterError

__all__ = ["GenerationOptions"]

_MAX_STOP_STRINGS = 16
_MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
_MAX_CHOICES = 1024
_MAX_GRAMMAR_CHARS = 65536


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
    ``seed`` makes sampling reproducible.

    ``logprobs=True`` fills :attr:`Result.logprobs` (one entry per generated
    token, from the model's distribution before any sampling setting or
    constraint); ``top_logprobs=k`` adds the k most likely tokens at each
    step (needs ``logprobs=True``, at most 20).

    At most one of ``json_schema``, ``regex`` and ``choice`` constrains the
    answer (needs ``pip install 'idefics-kit[structured]'``): ``json_schema``
    (a dict or JSON text; kept as compact JSON text, key order preserved)
    makes it a JSON value valid against the schema, ``regex`` a full match of
    the regular expression, ``choice`` exactly one of the given strings. A
    constrained answer ends when the grammar is complete (then the model's
    stop token) or at ``max_new_tokens``; ``stop`` strings cannot be combined
    with a constraint, since they could cut it. A bad value raises
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
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None

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
        if not isinstance(self.logprobs, bool):
            _fail("logprobs", "must be True or False", self.logprobs)
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            _fail("top_logprobs", f"must be an int in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            _fail("top_logprobs", "needs logprobs=True", self.top_logprobs)
        object.__setattr__(self, "stop", _narrow_stop(self.stop))
        object.__setattr__(self, "json_schema", _narrow_schema(self.json_schema))
        object.__setattr__(self, "choice", _narrow_choice(self.choice))
        if self.regex is not None and (
            not isinstance(self.regex, str) or not 0 < len(self.regex) <= _MAX_GRAMMAR_CHARS
        ):
            _fail(
                "regex",
                f"must be None or a non-empty string of at most {_MAX_GRAMMAR_CHARS} characters",
                self.regex,
            )
        given = [n for n in ("json_schema", "regex", "choice") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidParameterError(
                given[1],
                f"at most one of json_schema, regex and choice may be given, got {' and '.join(given)}",
                getattr(self, given[1]),
            )
        if given and self.stop:
            _fail(
                "stop",
                f"cannot be combined with {given[0]} (a stop string could cut the constrained answer; the constraint ends it)",
                self.stop,
            )
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @property
    def constrained(self) -> bool:
        """True when ``json_schema``, ``regex`` or ``choice`` constrains the answer."""
        return self.json_schema is not None or self.regex is not None or self.choice is not None

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
                    f"unknown generation option {short_repr(name)}; allowed: {', '.join(allowed)}",
                    overrides[name],
                )
        return dataclasses.replace(self, **overrides)


def _fail(name: str, rule: str, value: object) -> NoReturn:
    raise InvalidParameterError(name, f"{name} {rule}, got {short_repr(value)}", value)


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


def _narrow_schema(schema: object) -> str | None:
    # Stored as compact JSON text: hashable, immutable, and the key order
    # (which fixes the order of object properties in the answer) is kept.
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            _fail("json_schema", f"must be a dict or JSON text ({exc})", schema)
    elif isinstance(schema, Mapping):
        parsed = schema
    else:
        _fail("json_schema", "must be None, a dict or JSON text", schema)
    if not isinstance(parsed, Mapping):
        _fail("json_schema", "must be a JSON object (a JSON Schema)", schema)
    try:
        text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        _fail("json_schema", f"must hold only JSON values ({exc})", schema)
    if len(text) > _MAX_GRAMMAR_CHARS:
        _fail("json_schema", f"must be at most {_MAX_GRAMMAR_CHARS} characters as JSON", schema)
    return text


def _narrow_choice(choice: object) -> tuple[str, ...] | None:
    if choice is None:
        return None
    if isinstance(choice, str) or not isinstance(choice, (tuple, list)):
        _fail("choice", "must be None or a list of strings", choice)
    if not 0 < len(choice) <= _MAX_CHOICES:
        _fail("choice", f"must hold 1 to {_MAX_CHOICES} strings", choice)
    for item in choice:
        if not isinstance(item, str) or not item:
            _fail("choice", "must hold only non-empty strings", choice)
    return tuple(dict.fromkeys(choice))
