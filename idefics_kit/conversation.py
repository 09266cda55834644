"""Conversations: an optional system prompt and user/assistant turns of text and images.

A :class:`Conversation` is immutable: :meth:`Conversation.user` and
:meth:`Conversation.assistant` return a new conversation, so a base
conversation (say a system prompt and a few-shot example) can be reused::

    base = Conversation(system="Answer in one word.")
    conv = base.user(ImagePart.from_path("cat.jpg"), "What animal is this?")

Conversations convert to and from the usual chat-message format with
:meth:`Conversation.to_messages` and :meth:`Conversation.from_messages`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image

from idefics_kit.errors import ConversationError, ImageLoadError
from idefics_kit.images import ImagePart

__all__ = [
    "Conversation",
    "Part",
    "PartLike",
    "Role",
    "TextPart",
    "Turn",
    "TurnRole",
]

Role: TypeAlias = Literal["system", "user", "assistant"]
TurnRole: TypeAlias = Literal["user", "assistant"]

_TURN_ROLES: tuple[TurnRole, ...] = ("user", "assistant")
_ROLES: tuple[Role, ...] = ("system", "user", "assistant")
_BLOCK_TYPES = ("text", "image")
_ACCEPTED_PARTS = "str, TextPart, ImagePart, PIL.Image.Image, numpy.ndarray"
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPR_LIMIT = 60


def _surrogate_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate), or None.

    Such a str (from ``errors="surrogateescape"`` decoding or a bad JSON
    escape like ``"\\ud800"``) cannot be encoded as UTF-8, so no tokenizer can
    take it.
    """
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"contains the lone surrogate U+{ord(found.group()):04X} at index {found.start()}, "
        "which is not valid Unicode text; decode the input with errors='replace' or remove it"
    )


def _short_repr(value: object) -> str:
    """repr(value), cut to a readable length for error messages."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else f"{text[: _REPR_LIMIT - 3]}..."


@dataclass(frozen=True, slots=True, kw_only=True)
class TextPart:
    """A piece of text in a turn."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ConversationError(f"TextPart.text must be a str, got {type(self.text).__name__}")
        problem = _surrogate_problem(self.text)
        if problem is not None:
            raise ConversationError(f"TextPart.text {problem}")


Part: TypeAlias = TextPart | ImagePart
"""One element of a turn: text or an image."""

PartLike: TypeAlias = str | TextPart | ImagePart | Image.Image | npt.NDArray[Any]
"""What :meth:`Conversation.user` and :meth:`Conversation.assistant` accept as a part."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    """One user or assistant message: text and images, interleaved in order."""

    role: TurnRole
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in _TURN_ROLES:
            raise ConversationError(
                f"Turn role must be one of {', '.join(_TURN_ROLES)}, got {self.role!r}"
            )
        if isinstance(self.parts, list):
            # A list is an easy slip; store a tuple so the turn stays immutable.
            object.__setattr__(self, "parts", tuple(self.parts))
        if not isinstance(self.parts, tuple):
            raise ConversationError(
                f"Turn parts must be a tuple of TextPart/ImagePart, got {type(self.parts).__name__}"
            )
        if not self.parts:
            raise ConversationError(f"a {self.role} turn needs at least one part, got none")
        for index, part in enumerate(self.parts):
            if not isinstance(part, (TextPart, ImagePart)):
                raise ConversationError(
                    f"Turn parts[{index}] must be a TextPart or ImagePart, got "
                    f"{type(part).__name__}"
                )


def _coerce_parts(method: str, parts: tuple[object, ...]) -> tuple[Part, ...]:
    coerced: list[Part] = []
    for index, part in enumerate(parts):
        if isinstance(part, str):
            # An empty string adds nothing once texts are concatenated.
            if part:
                coerced.append(_text_part(part, f"{method}() argument {index} (0-based)"))
        elif isinstance(part, TextPart):
            if part.text:
                coerced.append(part)
        elif isinstance(part, ImagePart):
            coerced.append(part)
        elif isinstance(part, Image.Image):
            coerced.append(ImagePart.from_pil(part))
        elif isinstance(part, np.ndarray):
            coerced.append(ImagePart.from_array(part))
        else:
            hint = ""
            if isinstance(part, (bytes, bytearray, memoryview)):
                hint = "; wrap encoded image bytes with ImagePart.from_bytes(...)"
            elif isinstance(part, os.PathLike):
                hint = "; wrap an image file path with ImagePart.from_path(...)"
            raise ConversationError(
                f"{method}() argument {index} (0-based) has type {type(part).__name__}; "
                f"accepted types are {_ACCEPTED_PARTS}{hint}"
            )
    if not coerced:
        raise ConversationError(
            f"{method}() needs at least one non-empty part ({_ACCEPTED_PARTS}), got "
            f"{len(parts)} argument(s) and all were empty"
            if parts
            else f"{method}() needs at least one part ({_ACCEPTED_PARTS}), got none"
        )
    return tuple(coerced)


def _type_name(value: object) -> str:
    return type(value).__name__


def _text_part(text: str, where: str) -> TextPart:
    """A TextPart whose construction error, if any, names ``where`` the text came from."""
    try:
        return TextPart(text=text)
    except ConversationError as exc:
        raise ConversationError(f"{where}: {exc}") from exc


def _parse_content(content: object, where: str, *, text_only: bool) -> tuple[Part, ...]:
    """Parse a message's content (a str or a list of blocks) into parts."""
    if isinstance(content, str):
        return (_text_part(content, f"{where}['content']"),) if content else ()
    if not isinstance(content, (list, tuple)):
        raise ConversationError(
            f"{where}['content'] must be a str or a list of blocks, got {_type_name(content)}"
        )
    parts = (
        _parse_block(block, f"{where}['content'][{index}]", text_only=text_only)
        for index, block in enumerate(content)
    )
    return tuple(part for part in parts if part is not None)


def _parse_block(block: object, at: str, *, text_only: bool) -> Part | None:
    """One content block as a part; None for an empty text block."""
    if not isinstance(block, Mapping):
        raise ConversationError(
            f"{at} must be a mapping like {{'type': 'text', 'text': ...}}, got {_type_name(block)}"
        )
    if "type" not in block:
        raise ConversationError(
            f"{at} has no 'type' key; expected one of {', '.join(_BLOCK_TYPES)}, "
            f"found keys {sorted(str(key) for key in block)}"
        )
    kind = block["type"]
    if not isinstance(kind, str) or kind not in _BLOCK_TYPES:
        raise ConversationError(
            f"{at} has type {_short_repr(kind)}; allowed types are {', '.join(_BLOCK_TYPES)}"
        )
    if kind == "text":
        if "text" not in block:
            raise ConversationError(f"{at} is a text block without a 'text' key")
        text = block["text"]
        if not isinstance(text, str):
            raise ConversationError(f"{at}['text'] must be a str, got {_type_name(text)}")
        return _text_part(text, f"{at}['text']") if text else None
    if text_only:
        raise ConversationError(
            f"{at} is an image, but a system message may contain only text; "
            "put images in a user turn"
        )
    try:
        return ImagePart.from_message_content(block)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{at}: {exc}", source=exc.source) from exc
    except ConversationError as exc:
        raise ConversationError(f"{at}: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversation:
    """An optional system prompt and a sequence of user and assistant turns.

    Immutable: :meth:`user` and :meth:`assistant` return a new conversation.
    Two user turns in a row are allowed and kept as two turns.
    """

    system: str | None = None
    turns: tuple[Turn, ...] = ()

    def __post_init__(self) -> None:
        if self.system is not None and not isinstance(self.system, str):
            raise ConversationError(
                f"Conversation system must be a str or None, got {_type_name(self.system)}"
            )
        problem = None if self.system is None else _surrogate_problem(self.system)
        if problem is not None:
            raise ConversationError(f"Conversation system prompt {problem}")
        if isinstance(self.turns, list):
            object.__setattr__(self, "turns", tuple(self.turns))
        if not isinstance(self.turns, tuple):
            raise ConversationError(
                f"Conversation turns must be a tuple of Turn, got {_type_name(self.turns)}"
            )
        for index, turn in enumerate(self.turns):
            if not isinstance(turn, Turn):
                raise ConversationError(
                    f"Conversation turns[{index}] must be a Turn, got {_type_name(turn)}"
                )

    def user(self, *parts: PartLike) -> Conversation:
        """Return a new conversation with a user turn of ``parts`` appended.

        Parts are text (``str`` or :class:`TextPart`) and images
        (:class:`~idefics_kit.images.ImagePart`, a PIL image or a NumPy array)
        in any order. A ``str`` is always text: wrap a file path with
        ``ImagePart.from_path``. Empty strings are dropped.
        """
        return self._append("user", parts)

    def assistant(self, *parts: PartLike) -> Conversation:
        """Return a new conversation with an assistant turn of ``parts`` appended.

        Accepts the same parts as :meth:`user`; use it for few-shot examples
        and earlier answers.
        """
        return self._append("assistant", parts)

    def _append(self, role: TurnRole, parts: tuple[object, ...]) -> Conversation:
        turn = Turn(role=role, parts=_coerce_parts(role, parts))
        return Conversation(system=self.system, turns=(*self.turns, turn))

    def images(self) -> tuple[ImagePart, ...]:
        """Every image in the conversation, in order of appearance."""
        return tuple(
            part for turn in self.turns for part in turn.parts if isinstance(part, ImagePart)
        )

    def validate(self) -> None:
        """Raise ConversationError unless the conversation can be answered.

        It must have at least one turn and end with a user turn.
        """
        if not self.turns:
            raise ConversationError(
                "conversation is empty: add a user turn with Conversation().user(...)"
            )
        last = self.turns[-1]
        if last.role != "user":
            raise ConversationError(
                f"conversation ends with an {last.role} turn (turn {len(self.turns) - 1}, "
                "0-based), but generation answers the last user turn; append one with "
                ".user(...)"
            )

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, Any]]) -> Conversation:
        """Build a conversation from chat messages.

        Each message is ``{"role": "system" | "user" | "assistant", "content": ...}``
        where content is a str or a list of blocks ``{"type": "text", "text": ...}``
        and ``{"type": "image", "path" | "url" | "base64" | "image": ...}``. A
        system message may only come first and may only contain text.
        """
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise ConversationError(
                f"messages must be a list of {{'role': ..., 'content': ...}} mappings, got "
                f"{_type_name(messages)}"
            )
        system: str | None = None
        turns: list[Turn] = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, Mapping):
                raise ConversationError(
                    f"{where} must be a mapping with 'role' and 'content', got "
                    f"{_type_name(message)}"
                )
            missing = [key for key in ("role", "content") if key not in message]
            if missing:
                raise ConversationError(
                    f"{where} is missing {' and '.join(repr(key) for key in missing)}; "
                    f"found keys {sorted(str(key) for key in message)}"
                )
            role = message["role"]
            if not isinstance(role, str) or role not in _ROLES:
                raise ConversationError(
                    f"{where}['role'] must be one of {', '.join(_ROLES)}, got {_short_repr(role)}"
                )
            if role == "system":
                if index != 0:
                    raise ConversationError(
                        f"{where} is a system message, but a system message is only allowed "
                        "as the first message"
                    )
                texts = _parse_content(message["content"], where, text_only=True)
                system = "".join(part.text for part in texts if isinstance(part, TextPart))
                continue
            parts = _parse_content(message["content"], where, text_only=False)
            if not parts:
                raise ConversationError(
                    f"{where} ({role}) has no content; give it at least one non-empty text "
                    "or image block"
                )
            turns.append(Turn(role="user" if role == "user" else "assistant", parts=parts))
        return cls(system=system, turns=tuple(turns))

    def to_messages(self) -> list[dict[str, Any]]:
        """This conversation as JSON-serialisable chat messages (inverse of :meth:`from_messages`).

        The system prompt, if any, is the first message; every content is a
        list of blocks; images use :meth:`ImagePart.to_message_content
        <idefics_kit.images.ImagePart.to_message_content>`.
        """
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for turn in self.turns:
            content: list[dict[str, str]] = [
                {"type": "text", "text": part.text}
                if isinstance(part, TextPart)
                else part.to_message_content()
                for part in turn.parts
            ]
            messages.append({"role": turn.role, "content": content})
        return messages
