"""What text each token adds to an answer, as the SDK decodes answers.

Grammar engines and log-probability reports need every token's own text, and
tokenizers store it in three different ways:

* byte-level BPE (Llama 3, SmolLM): each token spells its bytes with GPT-2's
  byte-to-unicode alphabet (``"Ġred"`` is ``b" red"``, ``"Ċ"`` is ``b"\\n"``);
* SentencePiece BPE with byte fallback (Llama 2, Mistral): ``"▁"`` stands for
  a space and ``"<0x0A>"`` for one raw byte;
* anything else (a word-level vocabulary like the toy model's): the text is
  whatever the tokenizer's decoder makes of the token next to another one.

A grammar engine that takes these spellings literally lets ``"Ċ"`` or
``"<0x0A>"`` into a JSON string as if they were harmless letters, while the
decoded answer then holds a raw newline, which strict JSON parsers reject.
:func:`vocabulary` reads each token's bytes the way :meth:`FamilyAdapter.decode`
will produce them, both in the middle of an answer and as its first token
(SentencePiece and word-level decoders drop the answer's first space:
``"▁red"`` adds ``" red"`` after another token but starts an answer as
``"red"``). The tests check both against the tokenizer itself.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["Vocabulary", "logits_width", "vocabulary"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """Every token's text as bytes; None for control tokens (never text)."""

    pieces: tuple[bytes | None, ...]
    """What each token adds after another token, indexed by token id, as long as
    the model's logits (ids past the tokenizer: None)."""
    first_pieces: tuple[bytes | None, ...]
    """What each token adds as the first token of an answer."""
    byte_level: bool

    @property
    def drops_first_space(self) -> bool:
        """True when some token starts an answer without its leading space."""
        return self.pieces != self.first_pieces

    @property
    def size(self) -> int:
        """The number of token ids (the width of the model's logits)."""
        return len(self.pieces)

    def text(self, token_id: int) -> str:
        """The token's own text (U+FFFD for part of a UTF-8 character, "" for control tokens)."""
        piece = self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None
        return "" if piece is None else piece.decode("utf-8", errors="replace")

    def piece(self, token_id: int) -> bytes:
        """The token's own bytes (b"" for control tokens)."""
        piece = self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None
        return piece or b""


def logits_width(model: Any, tokenizer: Any) -> int:
    """How many token ids the model's logits cover (at least the tokenizer's)."""
    config = model.config.get_text_config()
    size = int(getattr(config, "vocab_size", 0) or 0)
    # IDEFICS 1 keeps its image tokens in a decoupled "additional" vocabulary.
    size += int(getattr(config, "additional_vocab_size", 0) or 0)
    return max(size, len(tokenizer))


_CACHE: weakref.WeakKeyDictionary[Any, dict[int, Vocabulary]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def vocabulary(tokenizer: Any, size: int | None = None) -> Vocabulary:
    """The :class:`Vocabulary` of a transformers tokenizer, ``size`` ids wide (cached)."""
    width = max(len(tokenizer), size or 0)
    with _LOCK:
        cached = _CACHE.get(tokenizer, {}).get(width)
    if cached is not None:
        return cached
    built = _build(tokenizer, width)
    with _LOCK:
        _CACHE.setdefault(tokenizer, {})[width] = built
    return built


def _control_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    data: dict[str, Any] = json.loads(backend.to_str())
    return data


def _has_type(node: object, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode, inverted.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _build(tokenizer: Any, width: int) -> Vocabulary:
    vocab: dict[str, int] = tokenizer.get_vocab()
    control = _control_ids(tokenizer)
    backend = _backend(tokenizer)
    byte_level = _has_type(backend.get("decoder"), "ByteLevel")
    byte_fallback = bool(backend.get("model", {}).get("byte_fallback"))
    pieces: list[bytes | None] = [None] * width
    ordinary = sorted(i for t, i in vocab.items() if i < width and i not in control)
    if byte_level:
        table = _byte_decoder()
        for token, index in vocab.items():
            if index < width and index not in control:
                try:
                    pieces[index] = bytes(table[c] for c in token)
                except KeyError:  # an added non-special token spelled in plain text
                    pieces[index] = token.encode()
        return Vocabulary(pieces=tuple(pieces), first_pieces=tuple(pieces), byte_level=True)
    # Decode each token after an anchor token: the text it adds in the middle
    # of an answer, leading space included.
    anchor, anchor_text = _anchor(tokenizer, ordinary)
    decoded = tokenizer.batch_decode(
        [[anchor, i] for i in ordinary],
        skip_special_tokens=False,
        clean_up_tokenization_spaces=False,
    )
    alone = tokenizer.batch_decode(
        [[i] for i in ordinary], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    first: list[bytes | None] = [None] * width
    id_to_token = {i: t for t, i in vocab.items()}
    for index, text, text_alone in zip(ordinary, decoded, alone, strict=True):
        match = _BYTE_PIECE.fullmatch(id_to_token[index]) if byte_fallback else None
        if match:
            # One raw byte; alone it decodes to U+FFFD unless it is ASCII.
            pieces[index] = bytes([int(match.group(1), 16)])
            first[index] = text_alone.encode() if pieces[index] == b" " else pieces[index]
            continue
        if text.startswith(anchor_text):
            pieces[index] = text[len(anchor_text) :].encode()
        else:  # pragma: no cover - a decoder that rewrites its neighbours
            pieces[index] = text_alone.encode()
        first[index] = text_alone.encode()
    return Vocabulary(pieces=tuple(pieces), first_pieces=tuple(first), byte_level=False)


def _anchor(tokenizer: Any, ordinary: list[int]) -> tuple[int, str]:
    for index in ordinary:
        text: str = tokenizer.decode([index], clean_up_tokenization_spaces=False)
        if text.strip() and "\ufffd" not in text:
            return index, text
    raise ValueError("the tokenizer has no token that decodes to visible text")
