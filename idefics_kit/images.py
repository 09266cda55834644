"""Image sources for conversations: :class:`ImagePart`.

An :class:`ImagePart` says where an image comes from (a file, encoded bytes, a
PIL image, a NumPy array, a base64 string or an http(s) URL). Building one only
does cheap validation; the image is read, downloaded and decoded by
:meth:`ImagePart.load`, which always returns a fresh 8-bit RGB
:class:`PIL.Image.Image` with EXIF orientation applied and any transparency
composited on white, because that is what every IDEFICS image processor expects.

Images often come from users of a web service, so loading is defensive: only
common raster formats are decoded, the pixel count is checked from the header
before any pixels are, and a URL is fetched only from public internet addresses
unless ``allow_private_network=True`` says the setup is trusted.

Every failure while reading or decoding raises
:class:`~idefics_kit.errors.ImageLoadError` whose ``source`` is
:meth:`ImagePart.describe`.

This module holds the :class:`ImagePart` class itself; reading and decoding
are in :mod:`idefics_kit._decode`, downloading in :mod:`idefics_kit._fetch`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image

from idefics_kit._decode import (
    ARRAY_LAYOUTS,
    array_problem,
    checked_rgb,
    decode,
    decode_base64,
    decode_error,
    file_error,
    open_file,
    sniff_mime,
    split_data_uri,
)
from idefics_kit._fetch import Cancellation, check_url, download
from idefics_kit.errors import ConversationError, ImageLoadError, InvalidParameterError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_URL_TIMEOUT",
    "Cancellation",
    "ImageKind",
    "ImagePart",
]

ImageKind: TypeAlias = Literal["path", "bytes", "pil", "array", "base64", "url"]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest ``width * height`` :meth:`ImagePart.load` decodes unless ``max_pixels=`` says otherwise."""

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
"""Largest body :meth:`ImagePart.from_url` downloads unless ``max_bytes=`` says otherwise."""

DEFAULT_URL_TIMEOUT = 10.0
"""Seconds :meth:`ImagePart.from_url` waits to connect and for each read."""

_KINDS: tuple[str, ...] = ("path", "bytes", "pil", "array", "base64", "url")
_MESSAGE_SOURCE_KEYS = ("path", "url", "base64", "image")


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass, but max_pixels=True is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidParameterError(name, f"{name} must be a positive int, got {value!r}", value)
    return value


def _check_timeout(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidParameterError(
            "timeout", f"timeout must be a finite number of seconds > 0, got {value!r}", value
        )
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"{name} must be True or False, got {value!r}", value)
    return value


def _shrunk(
    image: Image.Image, max_size: tuple[int, int], *, keep_aspect: bool = True
) -> Image.Image:
    """``image`` scaled down to fit ``max_size`` (see :meth:`ImagePart.load`); itself if it fits."""
    width, height = image.size
    max_width, max_height = max_size
    if width <= max_width and height <= max_height:
        return image
    if keep_aspect:
        scale = min(max_width / width, max_height / height)
        size = (
            min(max_width, max(1, round(width * scale))),
            min(max_height, max(1, round(height * scale))),
        )
    else:
        size = (min(width, max_width), min(height, max_height))
    # reducing_gap: a fast box reduction first, then bicubic; the large image
    # is dropped as soon as the small one exists.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


# -- ImagePart --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ImagePart:
    """One image in a conversation, read and decoded lazily.

    Build it with a ``from_*`` constructor, not by calling the class. Nothing
    is read or downloaded until :meth:`load` (or :meth:`sha256`) is called, so a
    missing file or an unreachable URL is reported then, as an
    :class:`~idefics_kit.errors.ImageLoadError`.

    Equality compares the source: the same path, URL, base64 text, bytes or
    array contents (and the same limits); a ``"pil"`` part equals another only
    if both wrap the very same PIL image object. Use :meth:`sha256` to compare
    image contents across kinds.
    """

    kind: ImageKind
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_private_network: bool = False
    """URL sources only: also fetch from loopback, private and link-local addresses."""
    # The file path or URL: small, so shown in repr.
    _location: str | None = None
    _base64: str | None = field(default=None, repr=False)
    _data: bytes | None = field(default=None, repr=False)
    _image: Image.Image | None = field(default=None, repr=False)
    _array: npt.NDArray[np.uint8] | None = field(default=None, repr=False)
    _timeout: float = DEFAULT_URL_TIMEOUT
    _max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ImageLoadError(
                f"ImagePart kind must be one of {', '.join(_KINDS)}, got {self.kind!r}",
                source=f"<{self.kind!r}>",
            )
        _check_positive_int("max_pixels", self.max_pixels)
        _check_bool("allow_private_network", self.allow_private_network)
        payload: object = {
            "path": self._location,
            "url": self._location,
            "bytes": self._data,
            "base64": self._data,
            "pil": self._image,
            "array": self._array,
        }[self.kind]
        if payload is None:
            raise ImageLoadError(
                f"ImagePart(kind={self.kind!r}) was built without its image; use "
                f"ImagePart.from_{self.kind}(...) instead of calling ImagePart directly",
                source=f"<{self.kind}>",
            )

    # -- constructors -------------------------------------------------------

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> ImagePart:
        """An image file on disk; it is opened only when loaded."""
        if not isinstance(path, (str, os.PathLike)):
            raise ImageLoadError(
                f"from_path() expects a str or os.PathLike path, got {type(path).__name__}",
                source=f"<{type(path).__name__}>",
            )
        location = os.fspath(path)
        if not isinstance(location, str):
            raise ImageLoadError(
                f"from_path() expects a str path, got a {type(location).__name__} path "
                f"{location!r}; decode it to str first",
                source=repr(location),
            )
        if not location:
            raise ImageLoadError("image path is empty; pass the path of an image file", source="")
        if "\x00" in location:
            raise ImageLoadError(
                f"image path {location!r} contains a NUL character at index "
                f"{location.index(chr(0))}; no file name can contain one",
                source=location,
            )
        return cls(kind="path", max_pixels=max_pixels, _location=location)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePart:
        """The bytes of an encoded image file (PNG, JPEG, GIF, WEBP, ...)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageLoadError(
                f"from_bytes() expects the bytes of an encoded image file, got "
                f"{type(data).__name__}",
                source=f"<{type(data).__name__}>",
            )
        # Copy so that a caller reusing a bytearray cannot change the image later.
        frozen = bytes(data)
        if not frozen:
            raise ImageLoadError(
                "image data is empty (0 bytes); pass the contents of an image file",
                source="<bytes: 0 bytes>",
            )
        return cls(kind="bytes", max_pixels=max_pixels, _data=frozen)

    @classmethod
    def from_pil(cls, image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePart:
        """A PIL image, used as-is (not copied) when loaded.

        The image is read at :meth:`load` time, at the frame it is on then, so
        keep it open and unchanged until generation is done.
        """
        if not isinstance(image, Image.Image):
            raise ImageLoadError(
                f"from_pil() expects a PIL.Image.Image, got {type(image).__name__}",
                source=f"<{type(image).__name__}>",
            )
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(
                f"PIL image is empty ({width}x{height}); width and height must be > 0",
                source=f"<PIL image {width}x{height} {image.mode}>",
            )
        return cls(kind="pil", max_pixels=max_pixels, _image=image)

    @classmethod
    def from_array(
        cls, array: npt.NDArray[Any], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> ImagePart:
        """A NumPy array: HxWx3 uint8 RGB, HxWx4 uint8 RGBA or HxW uint8 greyscale.

        The array is copied (read-only), so changing the caller's array later
        has no effect. Float arrays are refused: their scale (0..1 or 0..255)
        would be a guess.
        """
        if not isinstance(array, np.ndarray):
            raise ImageLoadError(
                f"from_array() expects a numpy.ndarray ({ARRAY_LAYOUTS}), got "
                f"{type(array).__name__}",
                source=f"<{type(array).__name__}>",
            )
        problem = array_problem(array)
        if problem is not None:
            raise ImageLoadError(problem, source=f"<array shape={array.shape} dtype={array.dtype}>")
        frozen: npt.NDArray[np.uint8] = np.array(array, dtype=np.uint8, copy=True, order="C")
        frozen.flags.writeable = False
        return cls(kind="array", max_pixels=max_pixels, _array=frozen)

    @classmethod
    def from_base64(cls, data: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePart:
        """Base64 text of an encoded image file, plain or as a ``data:image/...;base64,`` URI.

        The text is decoded (not the image) right away, so invalid base64 is
        reported here.
        """
        if not isinstance(data, str):
            raise ImageLoadError(
                f"from_base64() expects a str of base64 text, got {type(data).__name__}",
                source=f"<{type(data).__name__}>",
            )
        source = f"<base64: {len(data)} chars>"
        payload = data
        if data[:5].lower() == "data:":
            payload = split_data_uri(data, source=source)
        decoded = decode_base64(payload, source=source)
        return cls(kind="base64", max_pixels=max_pixels, _base64=data, _data=decoded)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_URL_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_private_network: bool = False,
    ) -> ImagePart:
        """An http(s) URL, downloaded each time the image is loaded or hashed.

        ``timeout`` is in seconds, for connecting and for each read, and the
        whole download (redirects included) must finish within three times
        that. The download stops as soon as more than ``max_bytes`` have
        arrived. At most 5 redirects are followed, each to http(s) only.

        By default the host must resolve only to public internet addresses:
        loopback, private, link-local, multicast, reserved and cloud-metadata
        addresses are refused before connecting, for the first URL and for
        every redirect, so that a URL from a user cannot reach internal
        services. Pass ``allow_private_network=True`` in trusted setups (an
        image server on the local network) to allow every address.
        """
        if not isinstance(url, str):
            raise ImageLoadError(
                f"from_url() expects a str URL, got {type(url).__name__}",
                source=f"<{type(url).__name__}>",
            )
        check_url(url)
        return cls(
            kind="url",
            max_pixels=max_pixels,
            allow_private_network=_check_bool("allow_private_network", allow_private_network),
            _location=url,
            _timeout=_check_timeout(timeout),
            _max_bytes=_check_positive_int("max_bytes", max_bytes),
        )

    @classmethod
    def from_message_content(cls, block: Mapping[str, object]) -> ImagePart:
        """Build an image from a chat-message block such as ``{"type": "image", "url": ...}``.

        Exactly one of the keys ``path``, ``url``, ``base64`` or ``image`` (a
        PIL image) must be present; a ``url`` that is a ``data:`` URI is read as
        base64. This is the inverse of :meth:`to_message_content`. URLs get
        the default address policy (public addresses only).
        """
        if not isinstance(block, Mapping):
            raise ConversationError(
                f"an image block must be a mapping like {{'type': 'image', 'url': ...}}, got "
                f"{type(block).__name__}"
            )
        found = [key for key in _MESSAGE_SOURCE_KEYS if key in block]
        if len(found) != 1:
            keys = sorted(str(key) for key in block)
            raise ConversationError(
                f"an image block needs exactly one of the keys {', '.join(_MESSAGE_SOURCE_KEYS)}; "
                f"found keys {keys}"
            )
        key = found[0]
        value = block[key]
        if key == "image":
            if not isinstance(value, Image.Image):
                raise ConversationError(
                    f"image block key 'image' must hold a PIL.Image.Image, got "
                    f"{type(value).__name__}"
                )
            return cls.from_pil(value)
        if key == "path":
            if not isinstance(value, (str, os.PathLike)):
                raise ConversationError(
                    f"image block key 'path' must be a str, got {type(value).__name__}"
                )
            return cls.from_path(value)
        if not isinstance(value, str):
            raise ConversationError(
                f"image block key {key!r} must be a str, got {type(value).__name__}"
            )
        if key == "base64" or value[:5].lower() == "data:":
            return cls.from_base64(value)
        return cls.from_url(value)

    # -- public API ---------------------------------------------------------

    def describe(self) -> str:
        """A short description of the source for messages: a path, a URL or ``<kind: size>``."""
        if self.kind in ("path", "url"):
            return str(self._location)
        if self.kind == "bytes":
            return f"<bytes: {len(self._data or b'')} bytes>"
        if self.kind == "base64":
            return f"<base64: {len(self._base64 or '')} chars>"
        if self.kind == "pil" and self._image is not None:
            width, height = self._image.size
            return f"<PIL image {width}x{height} {self._image.mode}>"
        if self._array is not None:
            return f"<array shape={self._array.shape} dtype={self._array.dtype}>"
        return f"<{self.kind}>"

    def load(
        self,
        *,
        max_size: tuple[int, int] | None = None,
        keep_aspect: bool = True,
        deadline: float | None = None,
        cancellation: Cancellation | None = None,
    ) -> Image.Image:
        """Read and decode the image into a new 8-bit RGB PIL image.

        EXIF orientation is applied, an animated image gives its first frame,
        and transparency is composited on white. Raises ImageLoadError if the
        source cannot be read or decoded, is not in a decoded format (PNG,
        JPEG, GIF, WEBP, BMP, TIFF, PPM, ICO, AVIF), or has more than
        ``max_pixels`` pixels.

        ``max_size=(width, height)`` scales a larger image down right after
        decoding (bicubic, with Pillow's reducing filter), so that only the
        small copy is kept: to at most that box keeping the aspect ratio, or
        with ``keep_aspect=False`` each side to at most its bound on its own.
        An image already within the box is returned exactly as decoded. A
        server passes what the model's processor resizes to, so nothing the
        model would see is lost.

        For a URL, ``deadline`` (a :func:`time.monotonic` value) ends the
        download, name resolution included, and ``cancellation`` stops it
        from another thread.
        """
        if max_size is not None:
            width, height = max_size
            _check_positive_int("max_size width", width)
            _check_positive_int("max_size height", height)
        try:
            image = self._load(deadline, cancellation)
        except ImageLoadError:
            raise
        # Corrupt files make Pillow's plugins raise almost anything (OSError,
        # SyntaxError, struct.error, IndexError...), so catch them all here.
        except Exception as exc:
            raise self._decode_error(exc) from exc
        if max_size is None:
            return image
        return _shrunk(image, max_size, keep_aspect=keep_aspect)

    def fetched(
        self, *, deadline: float | None = None, cancellation: Cancellation | None = None
    ) -> ImagePart:
        """A URL part downloaded now, as a ``"bytes"`` part (same ``max_pixels``); others as is.

        This splits a URL's network wait from its decoding, so that a server
        can run them in different thread pools. ``deadline`` and
        ``cancellation`` are as for :meth:`load`.
        """
        if self.kind != "url":
            return self
        data = self._encoded_bytes(deadline, cancellation)
        return ImagePart(kind="bytes", max_pixels=self.max_pixels, _data=data)

    def sha256(self) -> str:
        """A hex SHA-256 identifying the image content.

        For path, bytes, base64 and URL sources it hashes the encoded file bytes
        (so the same file via ``from_path`` and ``from_bytes`` gives the same
        hash; a URL is downloaded, a file read). For PIL and array sources it
        hashes the decoded RGB pixels and the size.
        """
        digest = hashlib.sha256()
        if self.kind in ("pil", "array"):
            image = self.load()
            digest.update(f"rgb:{image.width}x{image.height}:".encode())
            digest.update(image.tobytes())
        elif self.kind == "path":
            path = str(self._location)
            with open_file(path) as file:
                try:
                    while chunk := file.read(1024 * 1024):
                        digest.update(chunk)
                except OSError as exc:
                    raise file_error(path, exc) from exc
        else:
            digest.update(self._encoded_bytes())
        return digest.hexdigest()

    def to_message_content(self) -> dict[str, str]:
        """This image as a JSON-serialisable chat-message block, e.g. ``{"type": "image", "url": ...}``.

        Paths and URLs stay references; bytes keep their original encoding
        when it is a common image format; PIL images and arrays are encoded as
        a PNG ``data:`` URI.
        """
        if self.kind == "path":
            return {"type": "image", "path": str(self._location)}
        if self.kind == "url":
            return {"type": "image", "url": str(self._location)}
        if self.kind == "base64":
            return {"type": "image", "base64": str(self._base64)}
        mime = sniff_mime(self._data) if self._data is not None else None
        if mime is not None and self._data is not None:
            encoded = self._data
        else:
            buffer = io.BytesIO()
            self.load().save(buffer, format="PNG")
            mime, encoded = "image/png", buffer.getvalue()
        text = base64.b64encode(encoded).decode("ascii")
        return {"type": "image", "base64": f"data:{mime};base64,{text}"}

    # -- dunder -------------------------------------------------------------

    def __repr__(self) -> str:
        return f"ImagePart(kind={self.kind!r}, source={self.describe()!r})"

    def _key(self) -> tuple[object, ...]:
        payload: object
        if self.kind in ("path", "url"):
            payload = self._location
        elif self.kind == "base64":
            payload = self._base64
        elif self.kind == "bytes":
            payload = self._data
        elif self.kind == "pil":
            payload = id(self._image)
        else:
            # Arrays are compared element-wise in __eq__; shape and dtype keep
            # the hash cheap.
            payload = None if self._array is None else (self._array.shape, self._array.dtype.str)
        limits = (self.max_pixels, self.allow_private_network, self._timeout, self._max_bytes)
        return (self.kind, *limits, payload)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImagePart):
            return NotImplemented
        if self._key() != other._key():
            return False
        if self.kind == "pil":
            return self._image is other._image
        if self._array is not None and other._array is not None:
            return bool(np.array_equal(self._array, other._array))
        return True

    def __hash__(self) -> int:
        return hash(self._key())

    # -- internals: decoding ----------------------------------------------------

    def _encoded_bytes(
        self, deadline: float | None = None, cancellation: Cancellation | None = None
    ) -> bytes:
        if self.kind == "url":
            return download(
                str(self._location),
                timeout=self._timeout,
                max_bytes=self._max_bytes,
                allow_private_network=self.allow_private_network,
                deadline=deadline,
                cancellation=cancellation,
            )
        assert self._data is not None  # __post_init__ guarantees it for bytes and base64
        return self._data

    def _load(self, deadline: float | None, cancellation: Cancellation | None) -> Image.Image:
        if self.kind == "pil":
            assert self._image is not None
            return self._convert(self._image)
        if self.kind == "array":
            assert self._array is not None
            return self._convert(Image.fromarray(self._array))
        with self._open_stream(deadline, cancellation) as stream:
            return decode(stream, max_pixels=self.max_pixels, source=self.describe())

    def _open_stream(self, deadline: float | None, cancellation: Cancellation | None) -> IO[bytes]:
        if self.kind == "path":
            return open_file(str(self._location))
        return io.BytesIO(self._encoded_bytes(deadline, cancellation))

    def _convert(self, image: Image.Image) -> Image.Image:
        return checked_rgb(image, max_pixels=self.max_pixels, source=self.describe())

    def _decode_error(self, exc: BaseException) -> ImageLoadError:
        source = self.describe()
        if self.kind == "path" and isinstance(exc, (FileNotFoundError, PermissionError)):
            return file_error(source, exc)
        return decode_error(exc, max_pixels=self.max_pixels, source=source)
