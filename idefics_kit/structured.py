"""Structured output: answers constrained to a JSON Schema, a regex or a list of strings.

Grammars are compiled by xgrammar (the ``[structured]`` extra, imported only
here and only when a constraint is asked for) against the model's vocabulary
as :mod:`idefics_kit._vocab` reads it: each token's real bytes, so a byte-level
``"Ċ"`` or a byte-fallback ``"<0x0A>"`` is a raw newline to the grammar too and
can never slip into a JSON string. Control tokens (``<image>``, ``<s>``, tile
tags ...) are never allowed; the SDK's stop ids are the grammar's end tokens,
allowed once the grammar is complete and then the only tokens allowed.

:func:`compile_constraint` compiles once per (constraint, vocabulary) and
caches the result; :class:`RowConstraint` follows one row of a batch (fill its
mask, advance by the token chosen, finished or not); :class:`ConstraintProcessor`
masks the logits of every constrained row of a batch by its own matcher.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from idefics_kit._vocab import Vocabulary
from idefics_kit.errors import InvalidParameterError
from idefics_kit.options import GenerationOptions

__all__ = [
    "CompiledConstraint",
    "ConstraintProcessor",
    "RowConstraint",
    "compile_constraint",
    "constraint_of",
]

ConstraintKind = Literal["json_schema", "regex", "choice"]
_INSTALL_HINT = "pip install 'idefics-kit[structured]'"
_CACHE_SIZE = 256


def _xgrammar(parameter: str) -> ModuleType:
    try:
        import xgrammar
    except ImportError as exc:
        raise InvalidParameterError(
            parameter,
            f"{parameter} needs the optional grammar engine xgrammar, which is not installed: "
            f"{_INSTALL_HINT}",
        ) from exc
    return xgrammar


def constraint_of(options: GenerationOptions) -> tuple[ConstraintKind, str] | None:
    """``(kind, text)`` of the options' constraint, None when unconstrained.

    For ``choice`` the text is a regular expression matching exactly one of
    the strings.
    """
    if options.json_schema is not None:
        return "json_schema", options.json_schema
    if options.regex is not None:
        return "regex", options.regex
    if options.choice is not None:
        return "choice", "|".join(_escape(c) for c in options.choice)
    return None


def _escape(text: str) -> str:
    # Every character that is not a letter or digit is written \uXXXX
    # (surrogate pairs above the BMP), which xgrammar's regex reads literally.
    out = []
    for char in text:
        if char.isascii() and char.isalnum():
            out.append(char)
        elif ord(char) > 0xFFFF:
            code = ord(char) - 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
        else:
            out.append(f"\\u{ord(char):04X}")
    return "(?:" + "".join(out) + ")"


@dataclass(frozen=True, slots=True, eq=False)
class CompiledConstraint:
    """A grammar compiled for one vocabulary; share it between rows and calls."""

    kind: ConstraintKind
    text: str
    grammar: Any
    """xgrammar's CompiledGrammar over the tokens' mid-answer bytes."""
    first_grammar: Any
    """The same grammar over the tokens' answer-start bytes (None when they are the same)."""
    engine: _Engine


class _Engine:
    """xgrammar's compilers for one vocabulary and stop ids, and their cache."""

    def __init__(self, xgr: ModuleType, vocab: Vocabulary, stop_ids: Sequence[int]) -> None:
        self.xgr = xgr
        self.vocab = vocab
        self.stop_ids = tuple(i for i in stop_ids if 0 <= i < vocab.size)
        stops = set(self.stop_ids)
        # A stop token is never text, even where the tokenizer does not mark it special.
        pieces = [None if i in stops else p for i, p in enumerate(vocab.pieces)]
        first = [None if i in stops else p for i, p in enumerate(vocab.first_pieces)]
        self.compiler = self._compiler(pieces)
        self.first_compiler = self._compiler(first) if vocab.drops_first_space else None
        # Tokens that may ever be chosen: text tokens and stop tokens. JSON
        # answers are compact, so a raw control character (a byte below 0x20)
        # is never valid in them; the grammar alone would allow some in strings.
        text = torch.tensor([bool(p) for p in pieces])
        plain = torch.tensor([p is not None and p != b"" and min(p) >= 0x20 for p in pieces])
        text[list(self.stop_ids)] = True
        plain[list(self.stop_ids)] = True
        # Tokens holding raw bytes can together spell invalid UTF-8 (a
        # surrogate, an overlong form) that the grammar lets through; a token
        # is allowed only where it keeps the answer valid UTF-8.
        self.partial_bytes = any(p and not _is_utf8(p) for p in pieces)
        fresh = torch.tensor([_continues(b"", p) for p in pieces]) if self.partial_bytes else text
        fresh[list(self.stop_ids)] = True
        self.allowed = _pack(text & fresh).numpy()
        self.json_allowed = _pack(plain & fresh).numpy()
        self._pieces = pieces
        self._after: dict[bytes, np.ndarray[Any, Any]] = {}
        self.stop_only = _pack(
            torch.isin(torch.arange(vocab.size), torch.tensor(self.stop_ids))
        ).numpy()
        self.cache: OrderedDict[tuple[str, str], CompiledConstraint] = OrderedDict()
        self.lock = threading.Lock()

    def after(self, pending: bytes) -> np.ndarray[Any, Any]:
        """Tokens that continue the incomplete UTF-8 character ``pending`` validly (packed)."""
        with self.lock:
            found = self._after.get(pending)
        if found is None:
            found = _pack(torch.tensor([_continues(pending, p) for p in self._pieces])).numpy()
            with self.lock:
                self._after[pending] = found
        return found

    def _compiler(self, pieces: Sequence[bytes | None]) -> Any:
        info = self.xgr.TokenizerInfo(
            [p or b"" for p in pieces],
            self.xgr.VocabType.RAW,
            vocab_size=self.vocab.size,
            stop_token_ids=list(self.stop_ids),
            add_prefix_space=False,
        )
        return self.xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: ConstraintKind, text: str) -> CompiledConstraint:
        key = (kind, text)
        with self.lock:
            found = self.cache.get(key)
            if found is not None:
                self.cache.move_to_end(key)
                return found
        try:
            grammar = self._compile_with(self.compiler, kind, text)
            first = (
                self._compile_with(self.first_compiler, kind, text)
                if self.first_compiler is not None
                else None
            )
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses
            raise InvalidParameterError(
                kind,
                f"{kind} cannot be compiled into a grammar: {type(exc).__name__}: {exc}",
                text,
            ) from exc
        compiled = CompiledConstraint(
            kind=kind, text=text, grammar=grammar, first_grammar=first, engine=self
        )
        probe = RowConstraint(compiled)
        probe.allowed_mask()
        if probe.dead_end:
            raise InvalidParameterError(
                kind,
                f"{kind} cannot start with any token of this model's vocabulary "
                "(no token spells a valid first character)",
                text,
            )
        with self.lock:
            self.cache[key] = compiled
            while len(self.cache) > _CACHE_SIZE:
                self.cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile_with(compiler: Any, kind: ConstraintKind, text: str) -> Any:
        if kind == "json_schema":
            return compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        return compiler.compile_regex(text)


def _is_utf8(piece: bytes) -> bool:
    return _utf8_scan(piece) == len(piece)


def _utf8_scan(data: bytes) -> int | None:
    """Where the open (incomplete) character of ``data`` starts; None if ``data`` is invalid.

    Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing past U+10FFFF.
    Returns ``len(data)`` when every character is complete.
    """
    need, low, high, start = 0, 0x80, 0xBF, len(data)
    for index, byte in enumerate(data):
        if need:
            if not low <= byte <= high:
                return None
            need, low, high = need - 1, 0x80, 0xBF
            if not need:
                start = len(data)
            continue
        if byte < 0x80:
            continue
        start = index
        if 0xC2 <= byte <= 0xDF:
            need = 1
        elif byte == 0xE0:
            need, low = 2, 0xA0
        elif byte == 0xED:
            need, high = 2, 0x9F
        elif 0xE1 <= byte <= 0xEF:
            need = 2
        elif byte == 0xF0:
            need, low = 3, 0x90
        elif 0xF1 <= byte <= 0xF3:
            need = 3
        elif byte == 0xF4:
            need, high = 3, 0x8F
        else:
            return None
    return start if need else len(data)


def _continues(pending: bytes, piece: bytes | None) -> bool:
    """True when ``pending + piece`` is valid UTF-8 so far (a character may stay open)."""
    return bool(piece) and _utf8_scan(pending + (piece or b"")) is not None


def _pending(pending: bytes, piece: bytes) -> bytes:
    """The bytes of a character still open after ``pending + piece``."""
    data = pending + piece
    start = _utf8_scan(data)
    return data[start:] if start is not None else b""


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as xgrammar's int32 bitmask (bit j of word j // 32 is token j)."""
    words = (mask.numel() + 31) // 32
    padded = torch.zeros(words * 32, dtype=torch.int64)
    padded[: mask.numel()] = mask.to(torch.int64)
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    packed = (padded.view(words, 32) * weights).sum(dim=1)
    # Reinterpret as signed 32-bit words.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


_ENGINES: dict[tuple[int, tuple[int, ...]], tuple[Vocabulary, _Engine]] = {}
_ENGINES_LOCK = threading.Lock()


def compile_constraint(
    vocab: Vocabulary, stop_ids: Sequence[int], options: GenerationOptions
) -> CompiledConstraint | None:
    """The options' constraint compiled for ``vocab`` (cached); None when unconstrained.

    Raises :class:`InvalidParameterError` when the grammar engine is missing,
    the constraint does not compile, or no token of the vocabulary can start it.
    """
    found = constraint_of(options)
    if found is None:
        return None
    kind, text = found
    xgr = _xgrammar(kind)
    key = (id(vocab), tuple(stop_ids))
    with _ENGINES_LOCK:
        held = _ENGINES.get(key)
        engine = held[1] if held is not None and held[0] is vocab else None
        if engine is None:
            engine = _Engine(xgr, vocab, stop_ids)
            _ENGINES[key] = (vocab, engine)
    return engine.compile(kind, text)


class RowConstraint:
    """One row's progress through a compiled grammar."""

    def __init__(self, compiled: CompiledConstraint) -> None:
        engine = compiled.engine
        self._engine = engine
        self._matcher = engine.xgr.GrammarMatcher(compiled.grammar)
        self._first = (
            engine.xgr.GrammarMatcher(compiled.first_grammar)
            if compiled.first_grammar is not None
            else None
        )
        self._allowed = engine.json_allowed if compiled.kind == "json_schema" else engine.allowed
        self.kind = compiled.kind
        self._terminated = False
        self._steps = 0
        self._open = b""
        self.dead_end = False
        """True when no token could continue the grammar and the row was made to stop."""

    @property
    def is_finished(self) -> bool:
        """True once the grammar is complete and a stop token was accepted (or a dead end)."""
        return self.dead_end or self._terminated

    @property
    def is_complete(self) -> bool:
        """True when the text so far is a complete match (a stop token may follow)."""
        return bool(self._matcher.is_completed())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed next tokens into ``bitmask[row]`` (xgrammar layout)."""
        engine = self._engine
        words = bitmask.numpy()[row]  # a view: CPU, int32
        if self.is_finished:
            words[:] = engine.stop_only
            return
        matcher = self._first if self._steps == 0 and self._first is not None else self._matcher
        matcher.fill_next_token_bitmask(bitmask, row)
        np.bitwise_and(
            words, self._allowed if not self._open else engine.after(self._open), out=words
        )
        if not words.any():
            # The vocabulary cannot spell any continuation: end the row.
            self.dead_end = True
            words[:] = engine.stop_only

    def allowed_mask(self) -> torch.Tensor:
        """A bool tensor over the vocabulary: the tokens allowed next."""
        size = self._engine.vocab.size
        bitmask = self._engine.xgr.allocate_token_bitmask(1, size)
        self.fill_bitmask(bitmask, 0)
        bits: torch.Tensor = (bitmask[0].to(torch.int64).unsqueeze(1) >> torch.arange(32)) & 1
        return bits.reshape(-1)[:size].bool()

    def advance(self, token_id: int) -> None:
        """Move past the token chosen for this row; a stop token finishes the grammar."""
        if self.is_finished:
            return
        engine = self._engine
        if self._steps == 0 and self._first is not None and token_id not in engine.stop_ids:
            piece = engine.vocab.first_pieces[token_id] or b""
            accepted = bool(self._matcher.accept_string(piece))
        else:
            accepted = bool(self._matcher.accept_token(token_id))
            if token_id in engine.stop_ids:
                self._terminated = bool(self._matcher.is_terminated())
        self._steps += 1
        if engine.partial_bytes and token_id not in engine.stop_ids:
            self._open = _pending(self._open, engine.vocab.pieces[token_id] or b"")
        if not accepted:
            self.dead_end = True


class ConstraintProcessor:
    """A logits processor: masks each constrained row of a batch by its own matcher.

    ``rows[i]`` is row i's constraint (None: unconstrained). Call it with the
    ids so far (prompt included) and the next-token scores, as transformers
    calls a ``LogitsProcessor``; it advances each row by the tokens added
    since the last call, then sets every token its grammar forbids to -inf.
    """

    def __init__(
        self,
        rows: Sequence[RowConstraint | None],
        prompt_length: int,
        finished: Sequence[bool] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.seen = prompt_length
        # Rows another criterion ended (their own max_new_tokens, cancel) get
        # only padding afterwards: the grammar must not see it.
        self.finished = finished
        self.ended = [False] * len(self.rows)
        self.indices = [i for i, row in enumerate(self.rows) if row is not None]
        sizes = {row._engine.vocab.size for row in self.rows if row is not None}
        self.size = max(sizes) if sizes else 0
        self.bitmask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.indices:
            return scores
        if input_ids.shape[1] > self.seen:
            added = input_ids[:, self.seen :].tolist()
            for index in self.indices:
                row = self.rows[index]
                assert row is not None
                if not self.ended[index]:
                    for token in added[index]:
                        row.advance(token)
            self.seen = input_ids.shape[1]
        if self.finished is not None:
            self.ended = [a or bool(b) for a, b in zip(self.ended, self.finished, strict=True)]
        if self.bitmask is None:
            xgr = next(r for r in self.rows if r is not None)._engine.xgr
            self.bitmask = xgr.allocate_token_bitmask(len(self.rows), self.size)
        for index in self.indices:
            row = self.rows[index]
            assert row is not None
            row.fill_bitmask(self.bitmask, index)
        # Unpack the bits (xgrammar's layout: token j is bit j % 32 of word
        # j // 32, little-endian) and mask every constrained row in one op.
        words = self.bitmask.numpy()
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits[:, : min(scores.shape[-1], self.size)]).bool()
        if len(self.indices) < len(self.rows):
            allowed[[i for i, row in enumerate(self.rows) if row is None]] = True
        width = scores.shape[-1]
        if width > self.size:  # ids past the vocabulary are never allowed
            scores[self.indices, self.size :] = -float("inf")
        allowed = allowed.to(scores.device, non_blocking=True)
        scores[:, : allowed.shape[1]].masked_fill_(~allowed, -float("inf"))
        return scores
