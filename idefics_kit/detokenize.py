"""Answer text as tokens arrive, with bounded tokenizer work per token.

:class:`IncrementalDetokenizer` keeps ``adapter.decode(ids)`` of every id fed
so far, decoding only a short window of recent tokens at each step (the
prefix/read offsets of vLLM's and TGI's detokenizers). :class:`TextDecoder`
turns a row's tokens into the final text pieces of a stream on top of it,
holding back stop-string prefixes and incomplete characters exactly as the
whole-answer decoder it replaces did (its pieces are identical, token for
token), at a cost that no longer grows with the answer.

Why a window is exact
---------------------
``decode`` drops skipped special tokens first and then runs the tokenizer's
decoder over the remaining token strings, so the detokenizer drops them too
(by the same test: the token string is a special added token's content).
Every decoder the IDEFICS checkpoints use is *local*: its text splits at
"clean" token boundaries into what comes before and what comes after.

* ``Metaspace`` (SentencePiece, the tiny IDEFICS 1/2 checkpoints): each token
  maps to its own text; only the first token of a decode loses its ``▁``.
  Every boundary is clean.
* ``Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)]``
  (Llama 2, Mistral: idefics-9b, idefics2-8b): runs of ``<0xNN>`` pieces
  decode as a whole (all U+FFFD if invalid), then the text loses one leading
  space. A boundary is clean unless the token before it is a byte piece.
* No decoder (the toy model's word-level tokenizer): the tokens joined by
  spaces. Every boundary is clean.
* ``ByteLevel`` (Llama 3, SmolLM: IDEFICS 3, SmolVLM): the tokens' bytes,
  concatenated, decoded as UTF-8 with U+FFFD for each maximal invalid
  subpart. A byte offset is clean where no character is left open.

For the token-wise decoders, with ``r`` clean and ``n >= r``, the text of
``ids[r:n]`` does not depend on what comes before it, as long as something
does: for any non-empty list of tokens ``context`` whose last token is not a
byte piece::

    decode(ids[:n]) == decode(ids[:r]) + decode(context + ids[r:n])[len(decode(context)):]

(the context takes the first-token rules: the dropped ``▁``, the stripped
space). The detokenizer keeps ``decode(ids[:r])`` for the last clean ``r`` as
*stable* text, which no later token changes, and decodes a window of the
token before ``r`` (as context, its text cached per token) and the tokens
after it: two tokens per step in the common case, or a whole byte-fallback
run once it ends (a run decodes as one). The ids before ``r`` are never
decoded again.
For ``ByteLevel``, the text of the bytes after a clean byte offset does not
depend on the bytes before it, and a window may start inside a token: the
stable text covers every complete character, a small UTF-8 decoder with
Rust's maximal-subpart rule tracks the open one (at most three bytes, so at
most three tokens), and the window is those tokens plus the new ones, less the
text of their bytes before the open character.

Each window is checked against these rules as it is decoded (the context's
text is a prefix of the window's; the byte-level window is the UTF-8
decoder's text). A tokenizer whose decoder is not one of the above, an
adapter or tokenizer class that overrides ``decode``, or a failed check
falls back to decoding the whole answer at every step, which is always exact
(:attr:`IncrementalDetokenizer.resets` counts such fallbacks).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any, Literal

from idefics_kit._vocab import _byte_decoder
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions

__all__ = ["IncrementalDetokenizer", "TextDecoder"]

_REPLACEMENT = "\ufffd"
# ByteFallback reads a token as one byte when it is exactly "<0x" + two
# characters that Rust's u8::from_str_radix(_, 16) accepts + ">".
_BYTE_PIECE = re.compile(r"<0x(?:\+[0-9A-Fa-f]|[0-9A-Fa-f]{2})>")

_CHUNK = 256

Strategy = Literal["pieces", "bytes", "whole"]
"""How a tokenizer's text is kept: token windows, byte windows, or whole decodes."""


class _Text:
    """Append-only text stored in chunks: O(1) appends, slices without joining it all."""

    __slots__ = ("_chunks", "_ends", "length")

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._ends: list[int] = []
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, text: str) -> None:
        if not text:
            return
        self.length += len(text)
        # Short chunks are joined (a bounded copy), so that the slices near
        # the end, the ones a stream asks for, usually lie in one chunk.
        if self._chunks and len(self._chunks[-1]) < _CHUNK:
            self._chunks[-1] += text
            self._ends[-1] = self.length
        else:
            self._chunks.append(text)
            self._ends.append(self.length)

    def slice(self, start: int, stop: int) -> str:
        """``str(self)[start:stop]`` for ``0 <= start``, ``stop <= len(self)``."""
        if start >= stop:
            return ""
        last = self._chunks[-1]
        base = self.length - len(last)
        if start >= base:
            return last[start - base : stop - base]
        index = bisect_right(self._ends, start)
        offset = self._ends[index - 1] if index else 0
        parts: list[str] = []
        while offset < stop:
            chunk = self._chunks[index]
            parts.append(chunk[max(0, start - offset) : stop - offset])
            offset = self._ends[index]
            index += 1
        return "".join(parts)

    def __str__(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
            self._ends = [self._ends[-1]]
        return self._chunks[0] if self._chunks else ""


class _Utf8:
    """UTF-8 decoding with U+FFFD for each maximal invalid subpart, as Rust's from_utf8_lossy.

    Incremental: :meth:`decode` returns the characters that are complete and
    keeps an open character's bytes in :attr:`pending`. (Python's own
    incremental decoder keeps b"\\xed\\xb4" pending, where Rust has already
    made two U+FFFD of it.)
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def decode(self, data: bytes) -> str:
        out: list[str] = []
        pending = self.pending
        for byte in data:
            if pending:
                low, high = _second_byte(pending[0]) if len(pending) == 1 else (0x80, 0xBF)
                if low <= byte <= high:
                    pending += bytes((byte,))
                    if len(pending) == _width(pending[0]):
                        out.append(pending.decode("utf-8"))
                        pending = b""
                    continue
                out.append(_REPLACEMENT)
                pending = b""
            if byte < 0x80:
                out.append(chr(byte))
            elif _width(byte):
                pending = bytes((byte,))
            else:
                out.append(_REPLACEMENT)
        self.pending = pending
        return "".join(out)


def _width(lead: int) -> int:
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _second_byte(lead: int) -> tuple[int, int]:
    # No overlong forms, no surrogates, nothing past U+10FFFF.
    return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
        lead, (0x80, 0xBF)
    )


def _lossy(data: bytes) -> str:
    decoder = _Utf8()
    text = decoder.decode(data)
    return text + _REPLACEMENT if decoder.pending else text


class _Plan:
    """What one adapter's tokenizer needs from the detokenizer, with per-token caches."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        self.strategy: Strategy = "whole"
        self.byte_runs = False
        self._specials: frozenset[str] = frozenset()
        self._added: dict[int, str] = {}
        self._backend: Any = None
        self._table: dict[str, int] = {}
        self._skip: dict[int, bool] = {}
        self._bytes: dict[int, bytes] = {}
        self._byte_piece: dict[int, bool] = {}
        self._alone: dict[int, str] = {}
        backend = _backend(adapter)
        if backend is None:
            return
        decoder = backend.decoder
        strategy = _strategy(None if decoder is None else json.loads(decoder.__getstate__()))
        if strategy is None:
            return
        self.strategy, self.byte_runs = strategy
        self._backend = backend
        normalizer = backend.normalizer
        for index, token in backend.get_added_tokens_decoder().items():
            text = token.content
            if token.normalized and normalizer is not None:
                # What decode reads for such a token (tokenizers' normalized cache).
                text = normalizer.normalize_str(text)
            self._added[index] = text
        self._specials = frozenset(
            t.content for t in backend.get_added_tokens_decoder().values() if t.special
        )
        if self.strategy == "bytes":
            self._table = _byte_decoder()

    def _token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id]
        token: str | None = self._backend.id_to_token(token_id)
        return token

    def skipped(self, token_id: int) -> bool:
        """Whether ``decode`` drops this id (a special token, or one it does not know)."""
        known = self._skip.get(token_id)
        if known is None:
            token = self._token(token_id)
            known = self._skip[token_id] = token is None or token in self._specials
        return known

    def is_byte_piece(self, token_id: int) -> bool:
        """Whether ByteFallback reads this (kept) token as one raw byte."""
        known = self._byte_piece.get(token_id)
        if known is None:
            token = self._token(token_id) or ""
            known = self._byte_piece[token_id] = bool(_BYTE_PIECE.fullmatch(token))
        return known

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a ByteLevel decoder makes of this (kept) token."""
        known = self._bytes.get(token_id)
        if known is None:
            token = self._token(token_id) or ""
            try:
                known = bytes(self._table[c] for c in token)
            except KeyError:  # a token spelled in plain text: its UTF-8 bytes
                known = token.encode()
            self._bytes[token_id] = known
        return known

    def alone(self, token_id: int, decode: Any) -> str:
        """``decode([token_id])``, cached: the context of most windows."""
        known = self._alone.get(token_id)
        if known is None:
            known = self._alone[token_id] = decode([token_id])
        return known


def _backend(adapter: FamilyAdapter) -> Any:
    """The tokenizers.Tokenizer behind ``adapter.decode``, when nothing else changes its text."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tokenizer = adapter.tokenizer
    if (
        type(adapter).decode is not FamilyAdapter.decode
        or not isinstance(tokenizer, TokenizersBackend)
        or type(tokenizer).decode is not PreTrainedTokenizerBase.decode
        or type(tokenizer)._decode is not TokenizersBackend._decode
    ):
        return None
    return tokenizer.backend_tokenizer


_REPLACE = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}


def _strategy(decoder: Any) -> tuple[Strategy, bool] | None:
    """The strategy for a decoder (its JSON), and whether byte runs matter; None: unknown."""
    if decoder is None:  # no decoder (the toy model's): the tokens joined by spaces
        return "pieces", False
    if not isinstance(decoder, dict):
        return None
    kind = decoder.get("type")
    if kind == "Metaspace":
        return "pieces", False
    if kind == "ByteLevel":
        return "bytes", False
    if kind != "Sequence":
        return None
    # Steps in this order, each optional; Strip only after Fuse (the whole text).
    expected = ["Replace", "ByteFallback", "Fuse", "Strip"]
    seen: list[str] = []
    for step in decoder.get("decoders", []):
        name = step.get("type") if isinstance(step, dict) else None
        if name not in expected or (seen and expected.index(name) <= expected.index(seen[-1])):
            return None
        if name == "Replace" and step != _REPLACE:
            return None
        if name == "Strip" and (
            "Fuse" not in seen
            or step.get("content") != " "
            or step.get("start") not in (0, 1)
            or step.get("stop") != 0
        ):
            return None
        seen.append(name)
    return "pieces", "ByteFallback" in seen


_PLANS: weakref.WeakKeyDictionary[FamilyAdapter, _Plan] = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


def _plan_for(adapter: FamilyAdapter) -> _Plan:
    with _PLANS_LOCK:
        plan = _PLANS.get(adapter)
    if plan is None:
        plan = _Plan(adapter)
        with _PLANS_LOCK:
            plan = _PLANS.setdefault(adapter, plan)
    return plan


class IncrementalDetokenizer:
    """``adapter.decode(ids)`` of the ids fed so far, kept with bounded work per token.

    :meth:`feed` takes ids one at a time or in chunks. The text is
    :attr:`stable` (a prefix that no later token can change) followed by
    :attr:`unstable` (an incomplete character or byte-fallback run, at most a
    few characters in practice); :attr:`text` is both, and always equals
    ``adapter.decode`` of every id fed. Reading :attr:`unstable` after a
    feed that ended inside a byte-fallback run decodes that run, so callers
    that only need final text read :attr:`stable`.
    """

    def __init__(self, adapter: FamilyAdapter) -> None:
        self._adapter = adapter
        plan = _plan_for(adapter)
        self._plan = plan
        self.strategy: Strategy = plan.strategy
        """How this detokenizer works ("whole": decodes everything at every step)."""
        self.version = 0
        """Changes whenever the text may have changed."""
        self.resets = 0
        """Counts fallbacks to whole decoding, after which :attr:`stable` starts over."""
        self._ids: list[int] = []
        self._stable = _Text()
        self._replacements = 0
        # pieces/whole: the window's context (the last stable id) and its
        # text, then the ids not yet stable (ids[r:n]). bytes: the ids not yet stable,
        # and how many bytes of the first one are already stable text.
        self._context: list[int] = []
        self._context_text = ""
        self._open: list[int] = []
        self._open_skip = b""
        self._utf8 = _Utf8()
        self._unstable: str | None = ""

    @property
    def stable(self) -> int:
        """The length of the text's prefix that no later token can change."""
        return self._stable.length

    def stable_slice(self, start: int, stop: int) -> str:
        """``text[start:stop]`` within the stable prefix."""
        return self._stable.slice(start, min(stop, self._stable.length))

    @property
    def trailing_replacements(self) -> int:
        """How many U+FFFD end the stable text."""
        return self._replacements

    @property
    def unstable(self) -> str:
        """The text after :attr:`stable`."""
        if self._unstable is None:
            self._unstable = self._decode_open()
        return self._unstable

    @property
    def text(self) -> str:
        """``adapter.decode`` of every id fed (joins the text: O(its length))."""
        return str(self._stable) + self.unstable

    def feed(self, token_ids: Iterable[int]) -> None:
        """Add ``token_ids`` (special tokens are dropped, as ``decode`` drops them)."""
        plan = self._plan
        if self.strategy == "whole":
            new = list(token_ids)
        else:
            new = [t for t in token_ids if not plan.skipped(t)]
        if not new:
            return
        self.version += 1
        self._ids.extend(new)
        if self.strategy == "bytes":
            self._feed_bytes(new)
            return
        self._open.extend(new)
        self._unstable = None
        if self.strategy == "pieces" and not (plan.byte_runs and plan.is_byte_piece(new[-1])):
            self._commit_pieces()

    # -- pieces ------------------------------------------------------------------

    def _decode_open(self) -> str:
        if not self._open:
            return ""
        window = self._adapter.decode(self._context + self._open)
        if self.strategy == "whole":
            return window
        if not window.startswith(self._context_text):
            return self._fall_back()
        return window[len(self._context_text) :]

    def _commit_pieces(self) -> None:
        # The window ends on a clean boundary: all of it is stable now.
        tail = self._decode_open()
        if self.strategy == "whole":  # _decode_open fell back
            self._unstable = tail
            return
        self._append_stable(tail)
        # The next context: the last token, not a byte piece (the end is clean).
        last = self._open[-1]
        self._context = [last]
        self._context_text = self._plan.alone(last, self._adapter.decode)
        self._open = []
        self._unstable = ""

    # -- bytes -------------------------------------------------------------------

    def _feed_bytes(self, new: list[int]) -> None:
        plan = self._plan
        data = b"".join(plan.token_bytes(t) for t in new)
        expected = self._utf8.decode(data)
        pending = self._utf8.pending
        self._open.extend(new)
        window = self._adapter.decode(self._open)
        skip = _lossy(self._open_skip)
        if not window.startswith(skip):
            self._unstable = self._fall_back()
            return
        tail = window[len(skip) :]
        unstable = _REPLACEMENT if pending else ""
        if tail != expected + unstable:
            self._unstable = self._fall_back()
            return
        self._append_stable(expected)
        self._unstable = unstable
        # Keep the ids that hold the open character's bytes, and what of the
        # first one is already stable.
        keep, size = len(self._open), 0
        while size < len(pending):
            keep -= 1
            size += len(plan.token_bytes(self._open[keep]))
        self._open = self._open[keep:]
        first = plan.token_bytes(self._open[0]) if self._open else b""
        self._open_skip = first[: size - len(pending)]

    # -- shared ------------------------------------------------------------------

    def _append_stable(self, text: str) -> None:
        self._stable.append(text)
        kept = len(text.rstrip(_REPLACEMENT))
        if kept:
            self._replacements = len(text) - kept
        else:
            self._replacements += len(text)

    def _fall_back(self) -> str:
        # A window broke the rules this tokenizer was expected to follow:
        # decode the whole answer from now on (always exact).
        everything = list(self._ids)
        self.strategy = "whole"
        self.resets += 1
        self._stable = _Text()
        self._replacements = 0
        self._context, self._context_text = [], ""
        self._open = everything
        self._open_skip = b""
        return self._adapter.decode(everything) if everything else ""


class TextDecoder:
    """Turns one row's token ids, as they arrive, into text pieces that are final.

    A piece is held back only while it ends in an incomplete character, in a
    run of byte-fallback pieces, or in what could be the start of a stop
    string. The pieces, followed by :meth:`rest` of the final result, join to
    exactly ``finish(...).text``.

    The pieces are those of decoding the whole answer at every token (the
    decoder this one replaced): with ``text`` the decode of the ids up to
    the last one outside a trailing byte-fallback run, the answer ends once
    ``text`` holds a stop string; otherwise ``text`` without its trailing
    U+FFFD and without the longest stop-string prefix it ends with is *safe*,
    and the piece is what ``safe`` adds to the text emitted so far, provided
    it extends it. Each step only looks at the text that changed, plus the
    longest stop string's length before it.
    """

    def __init__(self, adapter: FamilyAdapter, options: GenerationOptions) -> None:
        self.adapter = adapter
        self.stop = options.stop
        self.limit = options.max_new_tokens
        self.stop_ids = set(adapter.stop_token_ids)
        self.byte_ids = adapter.byte_token_ids
        self.ids: list[int] = []
        self.ended = False
        self._detokenizer = IncrementalDetokenizer(adapter)
        self._longest = max(map(len, self.stop), default=0)
        self._emitted = _Text()
        self._end = 0  # ids[:_end] is what the text decodes: no trailing byte run
        self._fed = 0
        self._version = 0
        self._resets = 0
        self._searched = 0  # a prefix of every later text, free of stop strings
        self._agreed = 0  # a prefix of the emitted text known to equal the stable text
        self._diverged = False

    @property
    def emitted(self) -> str:
        """The text of the pieces so far."""
        return str(self._emitted)

    def feed(self, tokens: Iterable[int]) -> str:
        """The new final text after ``tokens`` ("" when nothing new is final yet)."""
        if self.ended:
            return ""
        for token in tokens:
            if token in self.stop_ids or len(self.ids) >= self.limit:
                self.ended = True
                break
            self.ids.append(token)
            # A trailing run of byte-fallback pieces may still turn into other
            # characters (or into U+FFFD as a whole): hold all of it back.
            if token not in self.byte_ids:
                self._end = len(self.ids)
        detokenizer = self._detokenizer
        if self._end > self._fed:
            detokenizer.feed(self.ids[self._fed : self._end])
            self._fed = self._end
        if detokenizer.version == self._version:
            return ""  # the same text as last time gives the same (empty) piece
        self._version = detokenizer.version
        unstable = detokenizer.unstable
        if detokenizer.resets != self._resets:
            self._resets = detokenizer.resets
            self._searched = self._agreed = 0
            self._diverged = False
        stable = detokenizer.stable
        if self.stop:
            start = max(0, self._searched - self._longest + 1)
            region = detokenizer.stable_slice(start, stable) + unstable
            if any(s in region for s in self.stop):
                self.ended = True
                return ""
            self._searched = stable
        # Byte-level tokenizers decode half a UTF-8 character as U+FFFD.
        kept = len(unstable.rstrip(_REPLACEMENT))
        length = stable + kept if kept else stable - detokenizer.trailing_replacements
        hold = 0
        if self.stop:
            end = self._slice(max(0, length - self._longest + 1), length, unstable)
            for s in self.stop:
                for size in range(min(len(s) - 1, length), hold, -1):
                    if end.endswith(s[:size]):
                        hold = size
                        break
        safe = length - hold
        emitted = len(self._emitted)
        if safe <= emitted or not self._extends_emitted(unstable):
            return ""
        piece = self._slice(emitted, safe, unstable)
        self._emitted.append(piece)
        self._agreed = min(safe, stable)
        return piece

    def rest(self, final_text: str) -> str:
        """What remains of ``final_text`` after the pieces already emitted."""
        emitted = len(self._emitted)
        return final_text[emitted:] if len(final_text) > emitted else ""

    def _slice(self, start: int, stop: int, unstable: str) -> str:
        """``text[start:stop]``, the text being the stable text then ``unstable``."""
        stable = self._detokenizer.stable
        head = self._detokenizer.stable_slice(start, stop) if start < stable else ""
        return head + unstable[max(0, start - stable) : max(0, stop - stable)]

    def _extends_emitted(self, unstable: str) -> bool:
        """Whether the current text starts with the emitted text."""
        stable = self._detokenizer.stable
        emitted = len(self._emitted)
        # The stable text never changes: compare each part of it once.
        upto = min(emitted, stable)
        if not self._diverged and self._agreed < upto:
            same = self._emitted.slice(self._agreed, upto)
            self._diverged = same != self._detokenizer.stable_slice(self._agreed, upto)
            self._agreed = upto
        if self._diverged:
            return False
        return (
            emitted <= stable
            or self._emitted.slice(stable, emitted) == unstable[: emitted - stable]
        )
