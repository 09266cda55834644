"""Tests for idefics_kit.conversation: building, validating and converting conversations."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from idefics_kit.conversation import Conversation, TextPart, Turn
from idefics_kit.errors import ConversationError, IdeficsKitError, ImageLoadError
from idefics_kit.images import ImagePart


def png_base64(colour: tuple[int, int, int] = (255, 0, 0)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# -- building ----------------------------------------------------------------------


def test_user_accepts_interleaved_parts() -> None:
    pil = Image.new("RGB", (2, 2))
    array = np.zeros((2, 2, 3), dtype=np.uint8)
    part = ImagePart.from_path("cat.png")
    conv = Conversation().user("Look: ", pil, "and", " ", array, TextPart(text="?"), part)
    (turn,) = conv.turns
    assert turn.role == "user"
    assert [type(p).__name__ for p in turn.parts] == [
        "TextPart",
        "ImagePart",
        "TextPart",
        "TextPart",
        "ImagePart",
        "TextPart",
        "ImagePart",
    ]
    # Adjacent strings stay separate parts.
    assert turn.parts[2] == TextPart(text="and")
    assert turn.parts[3] == TextPart(text=" ")
    assert [p.kind for p in conv.images()] == ["pil", "array", "path"]
    assert conv.images()[2] is part


def test_empty_strings_dropped() -> None:
    conv = Conversation().user("", "hi", TextPart(text=""), "")
    assert conv.turns[0].parts == (TextPart(text="hi"),)


def test_builders_return_new_conversations() -> None:
    base = Conversation(system="Be brief.").user("Q1").assistant("A1")
    first = base.user("Q2")
    second = base.user("Other")
    assert len(base.turns) == 2
    assert first.turns[-1].parts == (TextPart(text="Q2"),)
    assert second.turns[-1].parts == (TextPart(text="Other"),)
    assert first.system == second.system == "Be brief."
    assert first.turns[:2] == base.turns == second.turns[:2]
    with pytest.raises(FrozenInstanceError):
        base.system = "changed"  # type: ignore[misc]


def test_two_user_turns_in_a_row_kept() -> None:
    conv = Conversation().user("one").user("two")
    assert [turn.role for turn in conv.turns] == ["user", "user"]
    conv.validate()


def test_wrong_part_type() -> None:
    with pytest.raises(
        ConversationError,
        match=r"user\(\) argument 1 \(0-based\) has type int; accepted types are str, TextPart, "
        r"ImagePart, PIL.Image.Image, numpy.ndarray",
    ):
        Conversation().user("a", 3)  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match=r"assistant\(\) argument 0.*ImagePart.from_bytes"):
        Conversation().assistant(b"\x89PNG")  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match=r"has type PosixPath.*ImagePart.from_path"):
        Conversation().user(Path("cat.png"))  # type: ignore[arg-type]


def test_no_parts() -> None:
    with pytest.raises(ConversationError, match=r"user\(\) needs at least one part .* got none"):
        Conversation().user()
    with pytest.raises(ConversationError, match=r"got 2 argument\(s\) and all were empty"):
        Conversation().assistant("", "")


def test_bad_array_part_is_an_image_error() -> None:
    with pytest.raises(ImageLoadError, match="dtype=float64"):
        Conversation().user(np.zeros((2, 2, 3)))


def test_direct_construction_validated() -> None:
    turn = Turn(role="user", parts=[TextPart(text="x")])  # type: ignore[arg-type]
    assert turn.parts == (TextPart(text="x"),)
    assert Conversation(turns=[turn]).turns == (turn,)  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match="Turn role must be one of user, assistant"):
        Turn(role="system", parts=(TextPart(text="x"),))  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match="needs at least one part"):
        Turn(role="user", parts=())
    with pytest.raises(ConversationError, match=r"Turn parts\[0\] must be a TextPart or ImagePart"):
        Turn(role="user", parts=("x",))  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match=r"TextPart\.text must be a str, got int"):
        TextPart(text=5)  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match="system must be a str or None, got list"):
        Conversation(system=["x"])  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match=r"turns\[0\] must be a Turn, got str"):
        Conversation(turns=("x",))  # type: ignore[arg-type]


# -- validate ------------------------------------------------------------------------


def test_validate_empty() -> None:
    message = "conversation is empty: add a user turn with Conversation().user(...)"
    with pytest.raises(ConversationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Conversation(system="hi").validate()


def test_validate_last_turn_must_be_user() -> None:
    conv = Conversation().user("q").assistant("a")
    with pytest.raises(
        ConversationError,
        match=r"ends with an assistant turn \(turn 1, 0-based\), but generation answers the "
        "last user turn",
    ):
        conv.validate()
    conv.user("next").validate()


# -- from_messages / to_messages -------------------------------------------------------


def test_from_messages_formats() -> None:
    conv = Conversation.from_messages(
        [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "nice."}],
            },
            {"role": "user", "content": "Hello"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is "},
                    {"type": "image", "url": "https://x.test/a.png"},
                    {"type": "text", "text": ""},
                    {"type": "image", "path": "a.png"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ]
    )
    assert conv.system == "Be nice."
    assert [turn.role for turn in conv.turns] == ["user", "user", "assistant"]
    assert conv.turns[0].parts == (TextPart(text="Hello"),)
    assert conv.turns[1].parts == (
        TextPart(text="What is "),
        ImagePart.from_url("https://x.test/a.png"),
        ImagePart.from_path("a.png"),
    )


def test_system_string_content() -> None:
    conv = Conversation.from_messages([{"role": "system", "content": "S"}])
    assert conv.system == "S"
    assert conv.turns == ()


@pytest.mark.parametrize(
    ("messages", "error", "message"),
    [
        ({"role": "user"}, ConversationError, "messages must be a list .* got dict"),
        ("hello", ConversationError, "messages must be a list .* got str"),
        (["hello"], ConversationError, r"messages\[0\] must be a mapping .* got str"),
        (
            [{"role": "user"}],
            ConversationError,
            r"messages\[0\] is missing 'content'; found keys \['role'\]",
        ),
        ([{}], ConversationError, r"messages\[0\] is missing 'role' and 'content'"),
        (
            [{"role": "tool", "content": "x"}],
            ConversationError,
            r"messages\[0\]\['role'\] must be one of system, user, assistant, got 'tool'",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}],
            ConversationError,
            r"messages\[1\] is a system message, but a system message is only allowed as the first",
        ),
        (
            [{"role": "system", "content": [{"type": "image", "path": "a.png"}]}],
            ConversationError,
            r"messages\[0\]\['content'\]\[0\] is an image, but a system message may contain only",
        ),
        (
            [{"role": "user", "content": 5}],
            ConversationError,
            r"messages\[0\]\['content'\] must be a str or a list of blocks, got int",
        ),
        (
            [{"role": "user", "content": {"type": "text", "text": "x"}}],
            ConversationError,
            r"must be a str or a list of blocks, got dict",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}],
            ConversationError,
            r"messages\[0\]\['content'\]\[1\] has type 'video'; allowed types are text, image",
        ),
        (
            [{"role": "user", "content": [{"text": "a"}]}],
            ConversationError,
            r"\[0\] has no 'type' key; expected one of text, image, found keys \['text'\]",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            ConversationError,
            r"messages\[0\]\['content'\]\[0\] is a text block without a 'text' key",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            ConversationError,
            r"messages\[0\]\['content'\]\[0\]\['text'\] must be a str, got int",
        ),
        (
            [{"role": "user", "content": ["x"]}],
            ConversationError,
            r"messages\[0\]\['content'\]\[0\] must be a mapping .* got str",
        ),
        (
            [{"role": "user", "content": [{"type": "image"}]}],
            ConversationError,
            r"messages\[0\]\['content'\]\[0\]: an image block needs exactly one of the keys",
        ),
        (
            [{"role": "user", "content": [{"type": "image", "url": "ftp://a/b.png"}]}],
            ImageLoadError,
            r"messages\[0\]\['content'\]\[0\]: image URL scheme must be one of http, https",
        ),
        (
            [{"role": "assistant", "content": ""}],
            ConversationError,
            r"messages\[0\] \(assistant\) has no content",
        ),
        (
            [{"role": "user", "content": []}],
            ConversationError,
            r"messages\[0\] \(user\) has no content",
        ),
    ],
)
def test_from_messages_errors(messages: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Conversation.from_messages(messages)


def test_image_error_keeps_source() -> None:
    with pytest.raises(ImageLoadError) as info:
        Conversation.from_messages(
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "base64": "data:text/plain;base64,QQ=="}],
                }
            ]
        )
    assert info.value.source == "<base64: 27 chars>"


def test_to_messages_structure() -> None:
    conv = (
        Conversation(system="sys").user("a", ImagePart.from_path("p.png"), "b").assistant("answer")
    )
    assert conv.to_messages() == [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image", "path": "p.png"},
                {"type": "text", "text": "b"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
    ]
    assert Conversation().user("x").to_messages()[0]["role"] == "user"


def test_round_trip_all_image_kinds(tmp_path: Path) -> None:
    path = tmp_path / "blue.png"
    Image.new("RGB", (3, 3), (0, 0, 255)).save(path)
    pil = Image.new("RGBA", (2, 3), (0, 255, 0, 255))
    array = np.full((4, 2, 3), 7, dtype=np.uint8)
    conv = (
        Conversation(system="You see images.")
        .user("one", ImagePart.from_path(path), "two")
        .assistant("ok")
        .user(
            ImagePart.from_url("https://example.test/x.png"),
            ImagePart.from_base64(png_base64()),
            ImagePart.from_bytes(path.read_bytes()),
            pil,
            array,
        )
    )
    messages = conv.to_messages()
    text = json.dumps(messages)
    back = Conversation.from_messages(json.loads(text))

    assert back.system == conv.system
    assert [turn.role for turn in back.turns] == [turn.role for turn in conv.turns]
    for before, after in zip(conv.turns, back.turns, strict=True):
        assert len(before.parts) == len(after.parts)
        for a, b in zip(before.parts, after.parts, strict=True):
            if isinstance(a, TextPart):
                assert a == b
    originals, copies = conv.images(), back.images()
    # Referenced and encoded sources hash the same bytes; url is not fetched here.
    assert copies[0] == originals[0]
    assert copies[1] == originals[1]
    for index in (0, 2, 3):
        assert copies[index].sha256() == originals[index].sha256()
    # Decoded sources come back as PNG: equal pixels.
    for index in (4, 5):
        assert np.array_equal(np.asarray(copies[index].load()), np.asarray(originals[index].load()))
    # And a second round trip is stable.
    assert Conversation.from_messages(back.to_messages()).to_messages() == messages


# -- property tests ------------------------------------------------------------------------

_texts = st.text(max_size=8)
_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | _texts
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
    max_leaves=12,
)
_block = st.dictionaries(
    st.sampled_from(["type", "text", "path", "url", "base64", "image"]),
    st.sampled_from(["text", "image", "video", "", "data:image/png;base64,QUJD", "http://a.b/"])
    | _json,
    max_size=3,
)
_message = st.dictionaries(
    st.sampled_from(["role", "content", "name"]),
    st.sampled_from(["user", "assistant", "system"])
    | _texts
    | st.lists(_block, max_size=3)
    | _json,
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_message, max_size=4) | _json)
def test_from_messages_fuzz_raises_only_sdk_errors(messages: Any) -> None:
    try:
        conv = Conversation.from_messages(messages)
    except IdeficsKitError:
        return
    json.dumps(conv.to_messages())


_parts = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=10).map(lambda text: TextPart(text=text)),
        st.sampled_from(["a.png", "dir/b.jpg"]).map(ImagePart.from_path),
        st.sampled_from(["https://x.test/1.png", "http://y.test/2"]).map(ImagePart.from_url),
    ),
    min_size=1,
    max_size=4,
).map(tuple)
_turns = st.lists(
    st.builds(Turn, role=st.sampled_from(["user", "assistant"]), parts=_parts), max_size=4
).map(tuple)


@settings(max_examples=100, deadline=None)
@given(system=st.none() | st.text(max_size=10), turns=_turns)
def test_round_trip_property(system: str | None, turns: tuple[Turn, ...]) -> None:
    conv = Conversation(system=system, turns=turns)
    assert Conversation.from_messages(json.loads(json.dumps(conv.to_messages()))) == conv
