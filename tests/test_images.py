"""Tests for idefics_kit.images.ImagePart: sources, decoding, limits, errors."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import socket
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idefics_kit.errors import ConversationError, ImageLoadError, InvalidParameterError
from idefics_kit.images import DEFAULT_MAX_PIXELS, ImagePart

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def red_square_png(size: tuple[int, int] = (8, 6)) -> bytes:
    return encode(Image.new("RGB", size, RED))


# -- decoding and mode conversion ---------------------------------------------


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((2, 0), (0, 0, 255, 255))
    rgba.putpixel((3, 0), (0, 0, 0, 128))
    out = ImagePart.from_bytes(encode(rgba)).load()
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (2, 0)) == BLUE
    assert close_to(pixel(out, (3, 0)), (127, 127, 127), tolerance=2)


def test_cmyk_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
    out = ImagePart.from_bytes(encode(cmyk, "TIFF")).load()
    assert out.mode == "RGB"
    assert pixel(out, (1, 1)) == RED


def test_sixteen_bit_png_scaled_not_clipped() -> None:
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"  # the test exercises the 16-bit path
    out = ImagePart.from_bytes(data).load()
    assert out.mode == "RGB"
    assert np.asarray(out)[0, :, 0].tolist() == [0, 128, 255, 4]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("I", 32896, 128),  # 32-bit int: read as the 16-bit range
        ("I", 70000, 255),
        ("F", 200.0, 200),  # float: Pillow's 0..255 scale, clipped
        ("F", 1000.0, 255),
        ("L", 77, 77),
        ("1", 1, 255),
    ],
)
def test_grey_and_wide_modes(mode: str, value: float, expected: int) -> None:
    image = Image.new(mode, (2, 2), value)
    out = ImagePart.from_pil(image).load()
    assert out.mode == "RGB"
    assert pixel(out, (1, 1)) == (expected, expected, expected)


def test_palette_with_transparency() -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([*RED, *GREEN] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    data = encode(palette_image, transparency=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
        assert "transparency" in check.info
    out = ImagePart.from_bytes(data).load()
    assert pixel(out, (0, 0)) == WHITE  # the transparent index, not red
    assert pixel(out, (1, 0)) == GREEN


def test_la_composited_on_white() -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (50, 255))
    out = ImagePart.from_bytes(encode(la)).load()
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 0)) == (50, 50, 50)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    out = ImagePart.from_bytes(data).load()
    assert out.mode == "RGB"
    assert pixel(out, (2, 2)) == RED


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [
        (6, (17, 2)),  # rotate 90 degrees clockwise: top-left lands top-right
        (8, (2, 37)),  # rotate 90 degrees counter-clockwise: top-left lands bottom-left
    ],
)
def test_exif_orientation_applied(
    tmp_path: Path, orientation: int, red_corner: tuple[int, int]
) -> None:
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())

    out = ImagePart.from_path(path).load()
    assert out.size == (20, 40)
    assert close_to(pixel(out, red_corner), RED)
    assert close_to(pixel(out, (2, 2)), BLUE)  # the top-left is not where red went


def test_array_sources() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1] = GREEN
    out = ImagePart.from_array(rgb).load()
    assert out.size == (3, 2)
    assert pixel(out, (1, 0)) == GREEN

    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = (0, 0, 255, 255)
    out = ImagePart.from_array(rgba).load()
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 0)) == BLUE

    grey = np.full((2, 2), 9, dtype=np.uint8)
    assert pixel(ImagePart.from_array(grey).load(), (0, 0)) == (9, 9, 9)


def test_array_is_copied_and_read_only() -> None:
    array = np.zeros((2, 2, 3), dtype=np.uint8)
    part = ImagePart.from_array(array)
    array[:] = 255
    assert pixel(part.load(), (0, 0)) == (0, 0, 0)
    assert part._array is not None
    assert not part._array.flags.writeable


def test_load_returns_a_new_image_each_call() -> None:
    source = Image.new("RGB", (3, 3), RED)
    part = ImagePart.from_pil(source)
    first, second = part.load(), part.load()
    assert first is not second
    assert first is not source
    first.putpixel((0, 0), GREEN)
    assert pixel(part.load(), (0, 0)) == RED
    assert pixel(source, (0, 0)) == RED


# -- limits --------------------------------------------------------------------


def test_max_pixels_enforced() -> None:
    part = ImagePart.from_bytes(encode(Image.new("RGB", (4, 4))), max_pixels=10)
    with pytest.raises(
        ImageLoadError,
        match=r"image is 4 x 4 = 16 pixels, over the limit of 10; pass max_pixels= to raise it",
    ) as info:
        part.load()
    assert info.value.source == "<bytes: " + str(len(part._data or b"")) + " bytes>"
    assert ImagePart.from_bytes(encode(Image.new("RGB", (4, 4))), max_pixels=16).load()


def test_huge_header_rejected_before_decoding_without_warning() -> None:
    # 100M pixels: in Pillow's warning band, so this checks the warning is
    # suppressed and our own limit gives the message.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        with pytest.raises(ImageLoadError, match=r"10000 x 10000 = 100000000 pixels"):
            ImagePart.from_bytes(png_header_only(10_000, 10_000)).load()
        # 400M pixels: past Pillow's hard limit, which must not escape as its own error.
        with pytest.raises(ImageLoadError, match=r"larger than Pillow will decode") as info:
            ImagePart.from_bytes(png_header_only(20_000, 20_000)).load()
        elapsed = time.monotonic() - start
    assert caught == []
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)
    assert elapsed < 1.0
    assert DEFAULT_MAX_PIXELS == 50_000_000


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_invalid_max_pixels(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="max_pixels must be a positive int") as info:
        ImagePart.from_bytes(b"x", max_pixels=bad)  # type: ignore[arg-type]
    assert info.value.parameter == "max_pixels"
    assert info.value.value == bad


# -- errors --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    part = ImagePart.from_path(path)  # lazy: nothing read yet
    with pytest.raises(ImageLoadError, match="image file not found") as info:
        part.load()
    assert info.value.source == str(path)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(ImageLoadError, match="image file not found"):
        part.sha256()


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="is a directory, not a file") as info:
        ImagePart.from_path(tmp_path).load()
    assert info.value.source == str(tmp_path)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(red_square_png())

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(path))

    # Root ignores file modes, so simulate the OS refusing instead of chmod.
    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageLoadError, match="permission denied reading image file") as info:
        ImagePart.from_path(path).load()
    assert info.value.source == str(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"image file is empty \(0 bytes\)") as info:
        ImagePart.from_path(path).load()
    assert info.value.source == str(path)


def test_zero_bytes_rejected_at_construction() -> None:
    with pytest.raises(ImageLoadError, match=r"image data is empty \(0 bytes\)") as info:
        ImagePart.from_bytes(b"")
    assert info.value.source == "<bytes: 0 bytes>"


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("definitely not a picture")
    with pytest.raises(ImageLoadError, match="not an image Pillow can read") as info:
        ImagePart.from_path(path).load()
    assert info.value.source == str(path)
    with pytest.raises(ImageLoadError, match="not an image Pillow can read") as info:
        ImagePart.from_bytes(b"hello").load()
    assert info.value.source == "<bytes: 5 bytes>"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_data(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    part = ImagePart.from_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt") as info:
        part.load()
    assert info.value.source == f"<bytes: {len(data) // 2} bytes>"
    assert info.value.__cause__ is not None


def test_closed_pil_image() -> None:
    image = Image.new("RGB", (2, 2))
    part = ImagePart.from_pil(image)
    image.close()
    with pytest.raises(ImageLoadError, match="was closed before it was loaded") as info:
        part.load()
    assert info.value.source == "<PIL image 2x2 RGB>"


@pytest.mark.parametrize(
    ("array", "shape_text"),
    [
        (np.zeros((2, 2, 3), dtype=np.float32), r"shape=\(2, 2, 3\) dtype=float32"),
        (np.zeros((2, 2, 2), dtype=np.uint8), r"shape=\(2, 2, 2\) dtype=uint8"),
        (np.zeros((1, 2, 2, 3), dtype=np.uint8), r"shape=\(1, 2, 2, 3\) dtype=uint8"),
        (np.zeros((5,), dtype=np.uint8), r"shape=\(5,\) dtype=uint8"),
    ],
)
def test_array_validation(array: np.ndarray, shape_text: str) -> None:
    with pytest.raises(
        ImageLoadError, match=r"array must be HxWx3 uint8 \(RGB\).*got " + shape_text
    ):
        ImagePart.from_array(array)


def test_array_empty_and_wrong_type() -> None:
    with pytest.raises(ImageLoadError, match=r"empty.*got shape=\(0, 5, 3\)") as info:
        ImagePart.from_array(np.zeros((0, 5, 3), dtype=np.uint8))
    assert info.value.source == "<array shape=(0, 5, 3) dtype=uint8>"
    with pytest.raises(ImageLoadError, match=r"expects a numpy\.ndarray .* got list"):
        ImagePart.from_array([[1, 2]])  # type: ignore[arg-type]


def test_constructor_type_errors() -> None:
    with pytest.raises(ImageLoadError, match=r"from_bytes\(\) expects the bytes .* got str"):
        ImagePart.from_bytes("abc")  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match=r"from_pil\(\) expects a PIL\.Image\.Image, got int"):
        ImagePart.from_pil(3)  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match=r"from_path\(\) expects a str or os\.PathLike"):
        ImagePart.from_path(3)  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match="image path is empty"):
        ImagePart.from_path("")
    with pytest.raises(ImageLoadError, match="must be one of path, bytes"):
        ImagePart(kind="jpeg")  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match=r"use ImagePart\.from_path"):
        ImagePart(kind="path")


def test_frozen() -> None:
    part = ImagePart.from_path("a.png")
    with pytest.raises(FrozenInstanceError):
        part.kind = "url"  # type: ignore[misc]


# -- base64 --------------------------------------------------------------------


def test_base64_plain_and_data_uri() -> None:
    data = red_square_png()
    plain = base64.b64encode(data).decode()
    uri = "data:image/png;base64," + plain
    for text in (plain, uri, "\n".join(plain[i : i + 20] for i in range(0, len(plain), 20))):
        part = ImagePart.from_base64(text)
        assert part.kind == "base64"
        assert pixel(part.load(), (0, 0)) == RED
        assert part.sha256() == hashlib.sha256(data).hexdigest()
        assert part.describe() == f"<base64: {len(text)} chars>"
        assert part.to_message_content() == {"type": "image", "base64": text}


def test_base64_urlsafe_without_padding() -> None:
    data = red_square_png((5, 5)) + b"\xff\xfe"  # trailing bytes so '-'/'_' can appear
    text = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert ImagePart.from_base64(text)._data == data


def test_base64_wrong_mime() -> None:
    text = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    with pytest.raises(ImageLoadError, match=r"media type must be image/\*, got 'text/plain'") as i:
        ImagePart.from_base64(text)
    assert i.value.source == f"<base64: {len(text)} chars>"


def test_base64_invalid() -> None:
    with pytest.raises(ImageLoadError, match="invalid base64 image data"):
        ImagePart.from_base64("not base64 at all!!")
    with pytest.raises(ImageLoadError, match="must be base64-encoded"):
        ImagePart.from_base64("data:image/png,%89PNG")
    with pytest.raises(ImageLoadError, match="no ','"):
        ImagePart.from_base64("data:image/png;base64")
    with pytest.raises(ImageLoadError, match="base64 image data is empty"):
        ImagePart.from_base64("data:image/png;base64,")
    with pytest.raises(ImageLoadError, match="expects a str of base64 text, got bytes"):
        ImagePart.from_base64(b"abcd")  # type: ignore[arg-type]


# -- hashing, description, message content, equality -----------------------------


def test_sha256_same_for_path_bytes_and_base64(tmp_path: Path) -> None:
    data = red_square_png()
    path = tmp_path / "red.png"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert ImagePart.from_path(path).sha256() == expected
    assert ImagePart.from_bytes(data).sha256() == expected
    assert ImagePart.from_base64(base64.b64encode(data).decode()).sha256() == expected
    assert ImagePart.from_bytes(red_square_png((8, 7))).sha256() != expected


def test_sha256_decoded_sources() -> None:
    image = Image.new("RGB", (3, 2), RED)
    from_pil = ImagePart.from_pil(image).sha256()
    assert from_pil == ImagePart.from_array(np.asarray(image)).sha256()
    assert from_pil == ImagePart.from_pil(image.convert("RGBA")).sha256()
    # Same bytes, different size: the size is part of the hash.
    tall = np.zeros((2, 3, 3), dtype=np.uint8)
    wide = np.zeros((3, 2, 3), dtype=np.uint8)
    assert ImagePart.from_array(tall).sha256() != ImagePart.from_array(wide).sha256()
    assert len(from_pil) == 64


def test_describe() -> None:
    assert ImagePart.from_path("dir/cat.jpg").describe() == "dir/cat.jpg"
    assert ImagePart.from_url("https://x.test/a.png").describe() == "https://x.test/a.png"
    assert ImagePart.from_bytes(b"12345").describe() == "<bytes: 5 bytes>"
    assert ImagePart.from_pil(Image.new("RGB", (64, 48))).describe() == "<PIL image 64x48 RGB>"
    array = np.zeros((64, 48, 3), dtype=np.uint8)
    assert ImagePart.from_array(array).describe() == "<array shape=(64, 48, 3) dtype=uint8>"
    assert ImagePart.from_base64("QUJD").describe() == "<base64: 4 chars>"
    assert repr(ImagePart.from_path("c.png")) == "ImagePart(kind='path', source='c.png')"


def test_to_message_content(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    assert ImagePart.from_path(path).to_message_content() == {"type": "image", "path": str(path)}
    url = "http://x.test/a.png"
    assert ImagePart.from_url(url).to_message_content() == {"type": "image", "url": url}

    jpeg = encode(Image.new("RGB", (4, 4), RED), "JPEG")
    block = ImagePart.from_bytes(jpeg).to_message_content()
    prefix = "data:image/jpeg;base64,"
    assert block["base64"].startswith(prefix)
    assert base64.b64decode(block["base64"][len(prefix) :]) == jpeg  # original bytes kept

    # PPM is not a format kept as-is: it is re-encoded to PNG.
    ppm = encode(Image.new("RGB", (2, 2), GREEN), "PPM")
    block = ImagePart.from_bytes(ppm).to_message_content()
    assert block["base64"].startswith("data:image/png;base64,")
    assert pixel(ImagePart.from_message_content(block).load(), (1, 1)) == GREEN

    for part in (
        ImagePart.from_pil(Image.new("RGBA", (3, 2), (0, 0, 255, 255))),
        ImagePart.from_array(np.full((2, 3, 3), 255, dtype=np.uint8)),
    ):
        block = part.to_message_content()
        json.dumps(block)
        assert block["type"] == "image"
        assert block["base64"].startswith("data:image/png;base64,")
        back = ImagePart.from_message_content(block)
        assert np.array_equal(np.asarray(back.load()), np.asarray(part.load()))
        assert back.kind == "base64"


def test_from_message_content() -> None:
    image = Image.new("RGB", (2, 2))
    assert ImagePart.from_message_content({"type": "image", "path": "x.png"}).kind == "path"
    assert ImagePart.from_message_content({"type": "image", "url": "https://a.b/c"}).kind == "url"
    assert ImagePart.from_message_content({"type": "image", "base64": "QUJD"}).kind == "base64"
    from_pil = ImagePart.from_message_content({"type": "image", "image": image})
    assert from_pil.kind == "pil"
    assert from_pil == ImagePart.from_pil(image)
    data_url = "data:image/png;base64," + base64.b64encode(red_square_png()).decode()
    assert ImagePart.from_message_content({"url": data_url}).kind == "base64"

    with pytest.raises(
        ConversationError,
        match=r"exactly one of the keys path, url, base64, image; found keys \['base64', 'path'",
    ):
        ImagePart.from_message_content({"type": "image", "path": "a", "base64": "QUJD"})
    with pytest.raises(ConversationError, match=r"found keys \['pth', 'type'\]"):
        ImagePart.from_message_content({"type": "image", "pth": "a"})
    with pytest.raises(ConversationError, match=r"'image' must hold a PIL\.Image\.Image, got str"):
        ImagePart.from_message_content({"image": "cat.png"})
    with pytest.raises(ConversationError, match="key 'url' must be a str, got int"):
        ImagePart.from_message_content({"url": 3})
    with pytest.raises(ConversationError, match="must be a mapping"):
        ImagePart.from_message_content(["url"])  # type: ignore[arg-type]


def test_equality_and_hash() -> None:
    assert ImagePart.from_path("a.png") == ImagePart.from_path(Path("a.png"))
    assert hash(ImagePart.from_path("a.png")) == hash(ImagePart.from_path("a.png"))
    assert ImagePart.from_path("a.png") != ImagePart.from_path("b.png")
    assert ImagePart.from_path("a.png") != ImagePart.from_path("a.png", max_pixels=5)
    assert ImagePart.from_bytes(b"ab") == ImagePart.from_bytes(bytearray(b"ab"))
    first = ImagePart.from_array(np.zeros((2, 2), dtype=np.uint8))
    assert first == ImagePart.from_array(np.zeros((2, 2), dtype=np.uint8))
    assert first != ImagePart.from_array(np.ones((2, 2), dtype=np.uint8))
    assert len({first, ImagePart.from_array(np.zeros((2, 2), dtype=np.uint8))}) == 1
    image = Image.new("RGB", (2, 2))
    assert ImagePart.from_pil(image) == ImagePart.from_pil(image)
    assert ImagePart.from_pil(image) != ImagePart.from_pil(image.copy())
    assert first != "a.png"


# -- URLs ----------------------------------------------------------------------

PNG_BODY = red_square_png()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    release = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        # The client hanging up early is the point of some tests.
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/ok.png":
            self._send(200, PNG_BODY)
        elif self.path == "/empty":
            self._send(200, b"")
        elif self.path == "/big-declared":
            self._send(200, b"\x00" * 5000)
        elif self.path == "/big-stream":
            # No Content-Length: the client must count, and must stop early.
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"\x00" * 4000)
            self.wfile.flush()
            self.server.release.wait(5)
        elif self.path == "/slow":
            self.server.release.wait(3)
            self._send(200, PNG_BODY)
        elif self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/a.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
            patch.delenv(name, raising=False)
        server = _Server(("127.0.0.1", 0), _Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.release.set()
            server.shutdown()
            server.server_close()
            thread.join(5)


def test_url_ok(server_url: str) -> None:
    url = server_url + "/ok.png"
    part = ImagePart.from_url(url, allow_private_network=True)
    assert part.describe() == url
    assert pixel(part.load(), (0, 0)) == RED
    assert part.sha256() == hashlib.sha256(PNG_BODY).hexdigest()


def test_url_404(server_url: str) -> None:
    url = server_url + "/missing.png"
    with pytest.raises(ImageLoadError, match=r"HTTP error 404 .*" + url) as info:
        ImagePart.from_url(url, allow_private_network=True).load()
    assert info.value.source == url


def test_url_empty_body(server_url: str) -> None:
    with pytest.raises(ImageLoadError, match="downloaded 0 bytes"):
        ImagePart.from_url(server_url + "/empty", allow_private_network=True).load()


def test_url_declared_too_big(server_url: str) -> None:
    url = server_url + "/big-declared"
    with pytest.raises(ImageLoadError, match=r"over the limit of max_bytes=1000 .*announced 5000"):
        ImagePart.from_url(url, allow_private_network=True, max_bytes=1000).load()


def test_url_streamed_too_big_aborts_early(server_url: str) -> None:
    url = server_url + "/big-stream"
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"max_bytes=1000 .*stopped after receiving") as info:
        ImagePart.from_url(url, allow_private_network=True, max_bytes=1000, timeout=5).load()
    # The server keeps the connection open for 5 s after 4000 bytes, so only
    # stopping at the limit (not reading the whole body) returns this fast.
    assert time.monotonic() - start < 2
    assert info.value.source == url


def test_url_timeout(server_url: str) -> None:
    url = server_url + "/slow"
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 0.5 s .*pass a larger timeout="):
        ImagePart.from_url(url, allow_private_network=True, timeout=0.5).load()
    assert time.monotonic() - start < 2.5


def test_url_redirect_to_ftp_refused(server_url: str) -> None:
    with pytest.raises(ImageLoadError, match=r"redirect to 'ftp://127\.0\.0\.1/a\.png' refused"):
        ImagePart.from_url(server_url + "/to-ftp", allow_private_network=True).load()


def test_url_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.png"
    with pytest.raises(ImageLoadError, match="could not download image") as info:
        ImagePart.from_url(url, allow_private_network=True, timeout=2).load()
    assert info.value.source == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/a.png", r"scheme must be one of http, https, got 'ftp'"),
        ("file:///etc/passwd", r"scheme must be one of http, https, got 'file'"),
        ("cat.png", r"got '\(none\)'"),
        ("http://", "has no host"),
        ("http://[::1/a", "malformed"),
    ],
)
def test_url_rejected_at_construction(url: str, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message) as info:
        ImagePart.from_url(url)
    assert info.value.source == url


def test_url_parameters_validated() -> None:
    with pytest.raises(InvalidParameterError, match=r"timeout must be .* > 0, got 0"):
        ImagePart.from_url("http://a.test/x", timeout=0)
    with pytest.raises(InvalidParameterError, match=r"timeout must be .*, got inf"):
        ImagePart.from_url("http://a.test/x", timeout=float("inf"))
    with pytest.raises(InvalidParameterError, match="max_bytes must be a positive int, got -5"):
        ImagePart.from_url("http://a.test/x", max_bytes=-5)
