"""Property tests: no input makes the input layer raise anything but an IdeficsKitError.

``Conversation.from_messages`` gets arbitrary JSON-like structures and
near-valid chat messages; ``ImagePart`` gets arbitrary bytes, mutated valid
PNG/JPEG/GIF/WEBP/TIFF files, arbitrary base64 text, URLs and arrays. Each
either succeeds (and then the result is usable) or raises an
:class:`~idefics_kit.errors.IdeficsKitError`. Nothing here touches the network:
URLs are only built, never loaded.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from idefics_kit.conversation import Conversation, TextPart
from idefics_kit.errors import IdeficsKitError, ImageLoadError
from idefics_kit.images import ImagePart

T = TypeVar("T")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MAX_PIXELS = 4_000_000
"""Mutated headers can declare big images; this keeps each example fast."""


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png": _encode(rgb, "PNG"),
        "png_palette_transparency": _encode(palette, "PNG", transparency=3),
        "png_16bit": _encode(
            Image.fromarray(rng.integers(0, 65536, (6, 5), dtype=np.uint16)), "PNG"
        ),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=80, exif=exif.tobytes()),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gif_animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": _encode(rgb, "WEBP"),
        "tiff": _encode(rgb, "TIFF"),
        "bmp": _encode(rgb, "BMP"),
    }


SEEDS = _seed_images()


def _outcome(action: Callable[[], T]) -> T | IdeficsKitError:
    """What ``action`` returned, or the SDK error it raised; any other exception escapes."""
    try:
        return action()
    except IdeficsKitError as exc:
        return exc


def _check_loaded(part: ImagePart) -> None:
    """Load ``part``: an RGB image or an ImageLoadError, nothing else."""
    image = _outcome(part.load)
    if isinstance(image, IdeficsKitError):
        assert isinstance(image, ImageLoadError)
        assert image.source == part.describe()
        assert str(image)
        return
    assert image.mode == "RGB"
    assert image.width > 0
    assert image.height > 0
    assert image.width * image.height <= FUZZ_MAX_PIXELS


# -- images ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(min_size=1, max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    _check_loaded(ImagePart.from_bytes(data, max_pixels=FUZZ_MAX_PIXELS))


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        # Headers hold the interesting fields; bias positions toward the start.
        limit = draw(st.sampled_from([32, 128, len(data)]))
        at = draw(st.integers(0, max(0, min(limit, len(data)) - 1)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=4))
            data[at : at + len(chunk)] = chunk
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[draw(st.integers(min(8, len(data)), max(1, len(data)))) :]
    return bytes(data) or b"\x00"


@FUZZ
@given(_mutated())
def test_mutated_valid_images(data: bytes) -> None:
    _check_loaded(ImagePart.from_bytes(data, max_pixels=FUZZ_MAX_PIXELS))


@FUZZ
@given(_mutated())
def test_mutated_images_as_base64_data_uris(data: bytes) -> None:
    text = "data:image/png;base64," + base64.b64encode(data).decode()
    _check_loaded(ImagePart.from_base64(text, max_pixels=FUZZ_MAX_PIXELS))


_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n:;,"


@FUZZ
@given(st.text(alphabet=_BASE64_ALPHABET, max_size=64) | st.text(max_size=32))
def test_arbitrary_base64_text(text: str) -> None:
    part = _outcome(lambda: ImagePart.from_base64(text, max_pixels=FUZZ_MAX_PIXELS))
    if isinstance(part, IdeficsKitError):
        assert isinstance(part, ImageLoadError)
        return
    _check_loaded(part)


_URL_PIECES = st.sampled_from(
    ["http://", "https://", "ftp://", "//", "[", "]", "::1", "@", ":", "0", "65536", "/", "?", "#"]
)


@FUZZ
@given(st.lists(_URL_PIECES | st.text(max_size=6), max_size=8).map("".join))
def test_arbitrary_urls_are_built_or_refused(url: str) -> None:
    # Built only: loading would use the network.
    part = _outcome(lambda: ImagePart.from_url(url))
    if isinstance(part, IdeficsKitError):
        assert isinstance(part, ImageLoadError)
        assert part.source == url
        return
    assert part.describe() == url
    assert part.to_message_content() == {"type": "image", "url": url}


_ARRAY_DTYPES = st.sampled_from(
    [np.uint8, np.uint16, np.int8, np.int64, np.float32, np.float64, np.bool_, np.complex64]
)


@FUZZ
@given(
    hnp.arrays(
        dtype=_ARRAY_DTYPES,
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": True, "allow_infinity": True},
    )
    | hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6))
)
def test_arbitrary_arrays(array: np.ndarray[Any, Any]) -> None:
    part = _outcome(lambda: ImagePart.from_array(array))
    if isinstance(part, IdeficsKitError):
        assert isinstance(part, ImageLoadError)
        assert f"shape={array.shape}" in str(part)
        return
    _check_loaded(part)


# -- conversations --------------------------------------------------------------------------

_TEXT = st.text(max_size=8) | st.sampled_from(["", "a\x00b", "\ud800", "x\udfffy", "<image>"])
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | _TEXT
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=16,
)
_TINY_PNG = base64.b64encode(SEEDS["png"]).decode()
_IMAGE_VALUES = st.sampled_from(
    [
        "data:image/png;base64," + _TINY_PNG,
        _TINY_PNG,
        "data:text/plain;base64,QUJD",
        "data:image/png;base64,!!!",
        "https://images.test/cat.png",
        "http://127.0.0.1/x.png",
        "ftp://a/b.png",
        "http://a.test/\r\n",
        "cat.png",
        "",
        "a\x00.png",
    ]
)
_TEXT_BLOCK = st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT | _JSON})
_IMAGE_BLOCK = st.fixed_dictionaries(
    {"type": st.just("image")},
    optional={
        "path": _IMAGE_VALUES | _JSON,
        "url": _IMAGE_VALUES | _JSON,
        "base64": _IMAGE_VALUES | _JSON,
        "image": _JSON,
    },
)
_BLOCK = _TEXT_BLOCK | _IMAGE_BLOCK | st.dictionaries(st.sampled_from(["type", "text"]), _JSON)
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", "USER", ""]) | _JSON,
        "content": _TEXT | st.lists(_BLOCK, max_size=4) | _JSON,
        "name": _JSON,
    },
)


@FUZZ
@given(st.lists(_MESSAGE, max_size=5) | _JSON | st.lists(_JSON, max_size=3))
def test_from_messages_raises_only_sdk_errors(messages: Any) -> None:
    conv = _outcome(lambda: Conversation.from_messages(messages))
    if isinstance(conv, IdeficsKitError):
        assert str(conv)
        return
    # What was accepted is usable: serialisable, round-trips, and validate()
    # either passes or says why in an SDK error.
    saved = json.loads(json.dumps(conv.to_messages()))
    assert Conversation.from_messages(saved).to_messages() == saved
    for turn in conv.turns:
        for part in turn.parts:
            if isinstance(part, TextPart):
                part.text.encode("utf-8")  # valid Unicode only
    _outcome(conv.validate)
