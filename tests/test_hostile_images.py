"""Hostile and odd inputs: images and conversations as a web service receives them.

Broken input must fail with a specific ImageLoadError / ConversationError
naming the input, before any model work, and leave the Generator giving the
same answers as before. Odd but valid images must work on every family.
"""

from __future__ import annotations

import base64
import io
import os
import resource
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from idefics_kit import Conversation, Generator, Result, TextPart
from idefics_kit.errors import ConversationError, ImageLoadError
from idefics_kit.images import ImagePart
from tests.conftest import picture

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# -- building inputs -------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def raw_png(width: int, height: int, depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand, for layouts Pillow cannot save (16-bit RGB, 16-bit grey+alpha)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 100-byte PNG whose header declares width x height RGB pixels."""
    return raw_png(width, height, 8, 2, [b""])


def bomb_gif() -> bytes:
    """A 40-byte GIF whose screen and first frame declare 65535 x 65535 pixels."""
    data = encode(Image.new("L", (1, 1)), "GIF")
    data = data[:6] + b"\xff\xff\xff\xff" + data[10:]
    return data.replace(b",\x00\x00\x00\x00\x01\x00\x01\x00", b",\x00\x00\x00\x00\xff\xff\xff\xff")


def noise(fmt: str) -> bytes:
    return encode(picture(64, 64, seed=3), fmt)


def write(directory: Path, name: str, data: bytes) -> ImagePart:
    path = directory / name
    path.write_bytes(data)
    return ImagePart.from_path(path)


# -- hostile images -----------------------------------------------------------------------


@dataclass(frozen=True)
class Failing:
    """An image source that builds fine and fails when loaded."""

    build: Callable[[Path], ImagePart]
    message: str
    """Regex the ImageLoadError message must match."""


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>\n'
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
HTML = b"<!DOCTYPE html>\n<html><body>Not found</body></html>\n"

LOAD_FAILURES: dict[str, Failing] = {
    "zero_byte_file": Failing(
        lambda d: write(d, "empty.png", b""), r"image file is empty \(0 bytes\)"
    ),
    "truncated_png": Failing(
        lambda d: ImagePart.from_bytes(noise("PNG")[:600]), "truncated or corrupt"
    ),
    "truncated_jpeg": Failing(
        lambda d: ImagePart.from_bytes(noise("JPEG")[:600]), "truncated or corrupt"
    ),
    "truncated_jpeg_file": Failing(
        lambda d: write(d, "cut.jpg", noise("JPEG")[:600]), "truncated or corrupt"
    ),
    "png_bad_crc": Failing(
        lambda d: ImagePart.from_bytes(noise("PNG")[:29] + b"\x00\x00\x00\x00" + noise("PNG")[33:]),
        "truncated or corrupt",
    ),
    "text_named_jpg": Failing(
        lambda d: write(d, "photo.jpg", b"These are my holiday notes, not a photo.\n"),
        r"'.*photo\.jpg' is not an image Pillow can read here: it is text, not an image",
    ),
    "directory": Failing(lambda d: ImagePart.from_path(d), "is a directory, not a file"),
    "missing_path": Failing(
        lambda d: ImagePart.from_path(d / "nope.png"),
        r"image file not found: '.*nope\.png' \(current directory",
    ),
    "bomb_50k_x_50k": Failing(
        lambda d: ImagePart.from_bytes(bomb_png()),
        r"image is larger than Pillow will decode \(Image size \(2500000000 pixels\)",
    ),
    "heic": Failing(lambda d: ImagePart.from_bytes(HEIC), r"is a HEIC/HEIF image .*pillow-heif"),
    "svg": Failing(lambda d: write(d, "logo.svg", SVG), r"is an SVG \(vector\) image"),
    "pdf": Failing(lambda d: ImagePart.from_bytes(PDF), "is a PDF document, not an image"),
    "eps_not_run": Failing(lambda d: ImagePart.from_bytes(EPS), "is a PostScript/EPS file"),
    "html_page": Failing(lambda d: ImagePart.from_bytes(HTML), "is an HTML page"),
    "pcx_not_decoded": Failing(
        lambda d: ImagePart.from_bytes(encode(Image.new("RGB", (4, 4)), "PCX")),
        r"unrecognised format\); pass a PNG, JPEG, GIF, WEBP, BMP, TIFF, PPM, ICO or AVIF",
    ),
    "random_bytes": Failing(
        lambda d: ImagePart.from_bytes(bytes(range(256)) * 4), "unrecognised format"
    ),
}


@pytest.mark.parametrize("name", LOAD_FAILURES)
def test_hostile_image_fails_on_load(name: str, tmp_path: Path) -> None:
    case = LOAD_FAILURES[name]
    part = case.build(tmp_path)  # building reads nothing
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=case.message) as info:
        part.load()
    assert time.monotonic() - start < 1.0
    assert info.value.source == part.describe()


def test_decompression_bomb_fails_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[object] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        decoded.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="larger than Pillow will decode"):
        ImagePart.from_bytes(bomb_png()).load()
    # Apps often switch Pillow's own limit off; max_pixels still applies, from the header.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(
        ImageLoadError,
        match=r"image is 50000 x 50000 = 2500000000 pixels, over the limit of 50000000",
    ):
        ImagePart.from_bytes(bomb_png()).load()
    with pytest.raises(ImageLoadError, match="65535 x 65535 = 4294836225 pixels"):
        ImagePart.from_bytes(bomb_gif()).load()
    assert time.monotonic() - start < 0.5
    assert decoded == []  # no pixel data was decoded
    # 50k x 50k RGB would need 7.5 GB; allow generous noise in the peak RSS (KiB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(noise("PNG"))
    real_open = os.open

    def refuse(name: str | os.PathLike[str], *args: object, **kwargs: object) -> int:
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(name, *args, **kwargs)  # type: ignore[arg-type]

    # Root ignores file modes, so simulate the OS refusing instead of chmod.
    monkeypatch.setattr(os, "open", refuse)
    part = ImagePart.from_path(path)
    for action in (part.load, part.sha256):
        with pytest.raises(
            ImageLoadError, match=r"permission denied reading image file '.*secret\.png'"
        ) as info:
            action()
        assert info.value.source == str(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="is not a regular file"):
        ImagePart.from_path(fifo).load()
    assert time.monotonic() - start < 1.0


def test_device_file_refused() -> None:
    with pytest.raises(ImageLoadError, match=r"'/dev/zero' is not a regular file"):
        ImagePart.from_path("/dev/zero").load()


def test_pil_image_closed_before_use() -> None:
    image = picture(4, 4, seed=1)
    part = ImagePart.from_pil(image)
    image.close()
    with pytest.raises(ImageLoadError, match="was closed before it was loaded") as info:
        part.load()
    assert info.value.source == "<PIL image 4x4 RGB>"


def _png_base64(mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(noise("PNG")).decode()


CONSTRUCTION_FAILURES: dict[str, tuple[Callable[[], ImagePart], str]] = {
    "zero_bytes": (lambda: ImagePart.from_bytes(b""), r"image data is empty \(0 bytes\)"),
    "invalid_base64": (
        lambda: ImagePart.from_base64("iVBORw0KGgo!!!not base64"),
        "invalid base64 image data",
    ),
    "base64_non_ascii": (lambda: ImagePart.from_base64("iVBOR\u00e9"), "invalid base64"),
    "data_uri_wrong_mime": (
        lambda: ImagePart.from_base64(_png_base64("text/html")),
        r"data URI media type must be image/\*, got 'text/html'",
    ),
    "data_uri_not_base64": (
        lambda: ImagePart.from_base64("data:image/png,%89PNG"),
        "data URI must be base64-encoded",
    ),
    "array_float": (
        lambda: ImagePart.from_array(np.full((4, 4, 3), 0.5, dtype=np.float32)),
        r"got shape=\(4, 4, 3\) dtype=float32; float pixels are not guessed at",
    ),
    "array_nan": (
        lambda: ImagePart.from_array(np.full((4, 4, 3), np.nan)),
        r"dtype=float64 containing NaN or infinite values; float pixels",
    ),
    "array_int16": (
        lambda: ImagePart.from_array(np.zeros((4, 4, 3), dtype=np.int16)),
        r"array must be HxWx3 uint8 .* got shape=\(4, 4, 3\) dtype=int16",
    ),
    "array_bool": (
        lambda: ImagePart.from_array(np.zeros((4, 4), dtype=bool)),
        r"dtype=bool",
    ),
    "array_two_channels": (
        lambda: ImagePart.from_array(np.zeros((4, 4, 2), dtype=np.uint8)),
        r"shape=\(4, 4, 2\)",
    ),
    "array_batch": (
        lambda: ImagePart.from_array(np.zeros((2, 4, 4, 3), dtype=np.uint8)),
        r"shape=\(2, 4, 4, 3\)",
    ),
    "array_empty": (
        lambda: ImagePart.from_array(np.zeros((0, 4, 3), dtype=np.uint8)),
        r"array image is empty",
    ),
    "path_with_nul": (
        lambda: ImagePart.from_path("cat\x00.png"),
        r"contains a NUL character at index 3",
    ),
}


@pytest.mark.parametrize("name", CONSTRUCTION_FAILURES)
def test_hostile_image_fails_when_built(name: str) -> None:
    build, message = CONSTRUCTION_FAILURES[name]
    with pytest.raises(ImageLoadError, match=message):
        build()


# -- odd but valid images ------------------------------------------------------------------


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([*RED, *GREEN] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    return encode(image, transparency=0)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40)


@dataclass(frozen=True)
class Odd:
    """A valid image few people test with, and what load() must make of it."""

    data: Callable[[], bytes]
    size: tuple[int, int]
    checks: tuple[tuple[tuple[int, int], tuple[int, int, int]], ...] = ()
    """(x, y) -> expected RGB (within a JPEG's tolerance)."""


ODD_VALID: dict[str, Odd] = {
    "one_by_one": Odd(lambda: encode(Image.new("RGB", (1, 1), GREEN)), (1, 1), (((0, 0), GREEN),)),
    "tall_1x4000": Odd(lambda: encode(picture(1, 4000, seed=4)), (1, 4000)),
    "wide_4000x1": Odd(lambda: encode(picture(4000, 1, seed=5)), (4000, 1)),
    "png_16bit_grey": Odd(
        lambda: encode(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))),
        (3, 1),
        (((0, 0), (0, 0, 0)), ((1, 0), (128, 128, 128)), ((2, 0), WHITE)),
    ),
    "png_16bit_rgb": Odd(
        lambda: raw_png(2, 1, 16, 2, [struct.pack(">6H", 65535, 0, 0, 32896, 32896, 32896)]),
        (2, 1),
        (((0, 0), RED), ((1, 0), (128, 128, 128))),
    ),
    "grey_with_alpha": Odd(
        lambda: encode(
            Image.merge("LA", [Image.new("L", (4, 4), 50), Image.new("L", (4, 4), 255)])
        ),
        (4, 4),
        (((1, 1), (50, 50, 50)),),
    ),
    "grey_with_alpha_16bit": Odd(
        lambda: raw_png(2, 1, 16, 4, [struct.pack(">4H", 16448, 65535, 65535, 0)]),
        (2, 1),
        (((0, 0), (64, 64, 64)), ((1, 0), WHITE)),
    ),
    "cmyk_jpeg": Odd(
        lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        (8, 8),
        (((4, 4), RED),),
    ),
    "palette_transparency": Odd(
        _palette_with_transparency, (8, 8), (((1, 1), WHITE), ((6, 1), GREEN))
    ),
    "animated_gif_first_frame": Odd(lambda: _animated("GIF"), (8, 8), (((4, 4), RED),)),
    "animated_png_first_frame": Odd(lambda: _animated("PNG"), (8, 8), (((4, 4), RED),)),
}


def _close(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return all(abs(a - e) <= 8 for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("name", ODD_VALID)
def test_odd_valid_image_loads(name: str) -> None:
    case = ODD_VALID[name]
    image = ImagePart.from_bytes(case.data()).load()
    assert image.mode == "RGB"
    assert image.size == case.size
    for xy, expected in case.checks:
        value = image.getpixel(xy)
        assert isinstance(value, tuple)
        assert _close(value, expected), (xy, value, expected)


def _answers(result: Result) -> None:
    assert result.ok
    assert result.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 0


@pytest.mark.parametrize("name", ODD_VALID)
def test_odd_valid_image_through_generate(name: str, gen: Generator) -> None:
    part = ImagePart.from_bytes(ODD_VALID[name].data())
    _answers(gen.generate(Conversation().user(part, "What is this?"), max_new_tokens=2))


# -- hostile conversations -----------------------------------------------------------------


def test_nul_bytes_in_text_are_passed_to_the_model(gen: Generator) -> None:
    conv = Conversation(system="sys\x00tem").user(picture(8, 8, seed=2), "a\x00b", "\x00")
    _answers(gen.generate(conv, max_new_tokens=2))
    assert Conversation.from_messages(conv.to_messages()).turns[0].parts[1].text == "a\x00b"  # type: ignore[union-attr]


SURROGATES: dict[str, tuple[Callable[[], object], str]] = {
    "user_part": (
        lambda: Conversation().user("ok", "ab\ud800c"),
        r"user\(\) argument 1 \(0-based\): TextPart\.text contains the lone surrogate U\+D800 "
        "at index 2",
    ),
    "assistant_part": (
        lambda: Conversation().assistant("\udfff"),
        r"assistant\(\) argument 0 \(0-based\): .* U\+DFFF at index 0",
    ),
    "system_prompt": (
        lambda: Conversation(system="x\ud83d"),
        r"Conversation system prompt contains the lone surrogate U\+D83D at index 1",
    ),
    "message_str_content": (
        lambda: Conversation.from_messages([{"role": "user", "content": "hi \ud800"}]),
        r"messages\[0\]\['content'\]: TextPart\.text contains .* U\+D800 at index 3",
    ),
    "message_text_block": (
        lambda: Conversation.from_messages(
            [
                {"role": "system", "content": "fine"},
                {"role": "user", "content": [{"type": "text", "text": "..\udc80"}]},
            ]
        ),
        r"messages\[1\]\['content'\]\[0\]\['text'\]: .* U\+DC80 at index 2",
    ),
    "system_message": (
        lambda: Conversation.from_messages([{"role": "system", "content": "\ud800"}]),
        r"messages\[0\]\['content'\]: .* U\+D800 at index 0",
    ),
}


@pytest.mark.parametrize("name", SURROGATES)
def test_lone_surrogates_rejected_with_position(name: str) -> None:
    build, message = SURROGATES[name]
    with pytest.raises(ConversationError, match=message):
        build()


def test_lone_surrogate_text_part_names_index() -> None:
    with pytest.raises(ConversationError) as info:
        TextPart(text="abc\ud800def")
    assert str(info.value) == (
        "TextPart.text contains the lone surrogate U+D800 at index 3, which is not valid "
        "Unicode text; decode the input with errors='replace' or remove it"
    )


def test_two_user_turns_in_a_row_are_kept(gen: Generator) -> None:
    conv = Conversation().user("First question.").user(picture(8, 8, seed=6), "Second one?")
    assert [turn.role for turn in conv.turns] == ["user", "user"]
    _answers(gen.generate(conv, max_new_tokens=2))


UNANSWERABLE: dict[str, tuple[Conversation, str]] = {
    "empty": (
        Conversation(),
        "conversation is empty: add a user turn with Conversation().user(...)",
    ),
    "only_system": (
        Conversation(system="You are helpful."),
        "conversation is empty: add a user turn with Conversation().user(...)",
    ),
    "ends_with_assistant": (
        Conversation().user("Hi").assistant("Hello!"),
        "conversation ends with an assistant turn (turn 1, 0-based), but generation answers "
        "the last user turn; append one with .user(...)",
    ),
}


@pytest.mark.parametrize("name", UNANSWERABLE)
def test_unanswerable_conversation_exact_message(name: str, gen: Generator) -> None:
    conv, message = UNANSWERABLE[name]
    with pytest.raises(ConversationError) as info:
        conv.validate()
    assert str(info.value) == message
    with pytest.raises(ConversationError) as info:
        gen.generate(conv, max_new_tokens=2)
    assert str(info.value) == message


# -- nothing is half-done ----------------------------------------------------------------------


def test_failures_leave_the_generator_unchanged(
    gen: Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = Conversation(system="Be brief.").user(picture(20, 16, seed=9), "Describe it.")
    before = gen.generate(good, max_new_tokens=4)

    closed = picture(4, 4, seed=1)
    closed_part = ImagePart.from_pil(closed)
    closed.close()
    failing = [ImagePart.from_pil(picture(8, 8, seed=1))]  # a good image before the bad one
    for name, case in LOAD_FAILURES.items():
        conv = good.user(*failing, case.build(tmp_path), f"case {name}")
        with pytest.raises(ImageLoadError, match=case.message):
            gen.generate(conv, max_new_tokens=4)
    with pytest.raises(ImageLoadError, match="was closed before it was loaded"):
        gen.generate(good.user(closed_part, "?"), max_new_tokens=4)
    for conv, message in UNANSWERABLE.values():
        with pytest.raises(
            ConversationError, match=message.replace("(", r"\(").replace(")", r"\)")
        ):
            gen.generate(conv, max_new_tokens=4)

    assert gen.generate(good, max_new_tokens=4) == before
