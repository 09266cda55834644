"""Image sources for conversations: :class:`ImagePart`.

An :class:`ImagePart` says where an image comes from (a file, encoded bytes, a
PIL image, a NumPy array, a base64 string or an http(s) URL). Building one only
does cheap validation; the image is read, downloaded and decoded by
:meth:`ImagePart.load`, which always returns a fresh 8-bit RGB
:class:`PIL.Image.Image` with EXIF orientation applied and any transparency
composited on white, because that is what every IDEFICS image processor expects.

Every failure while reading or decoding raises
:class:`~idefics_kit.errors.ImageLoadError` whose ``source`` is
:meth:`ImagePart.describe`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from idefics_kit.errors import ConversationError, ImageLoadError, InvalidParameterError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_URL_TIMEOUT",
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
_URL_SCHEMES = ("http", "https")
_MESSAGE_SOURCE_KEYS = ("path", "url", "base64", "image")
_DOWNLOAD_CHUNK = 64 * 1024
_USER_AGENT = "idefics-kit (Python urllib)"
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ARRAY_LAYOUTS = "HxWx3 uint8 (RGB), HxWx4 uint8 (RGBA) or HxW uint8 (greyscale)"

# Magic numbers of the formats a chat template or an HTTP client is likely to
# accept as-is; anything else is re-encoded to PNG for message content.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
)


def _sniff_mime(data: bytes) -> str | None:
    for magic, offset, mime in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if mime == "image/webp" and not data.startswith(b"RIFF"):
                continue
            return mime
    return None


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


def _decode_base64(text: str, *, source: str) -> bytes:
    # Accept what people paste: MIME-style line breaks, URL-safe alphabet, no padding.
    compact = "".join(text.split())
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(
            f"invalid base64 image data ({exc}); pass the base64 text of an encoded image "
            "file, optionally as a 'data:image/<type>;base64,' URI",
            source=source,
        ) from exc
    if not data:
        raise ImageLoadError(
            "base64 image data is empty; pass the base64 text of an encoded image file",
            source=source,
        )
    return data


def _split_data_uri(text: str, *, source: str) -> str:
    """Return the base64 payload of a ``data:`` URI after checking its media type."""
    header, comma, payload = text.partition(",")
    if not comma:
        raise ImageLoadError(
            "data URI has no ',' separating the header from the data; expected "
            "'data:image/<type>;base64,<data>'",
            source=source,
        )
    params = header[len("data:") :].split(";")
    mime = params[0].strip().lower()
    if not mime.startswith("image/"):
        raise ImageLoadError(
            f"data URI media type must be image/*, got {mime or '(none)'!r}",
            source=source,
        )
    if params[-1].strip().lower() != "base64":
        raise ImageLoadError(
            f"data URI must be base64-encoded ('data:{mime};base64,...'), got header {header!r}",
            source=source,
        )
    return payload


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to a new 8-bit RGB image, compositing alpha on white."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        # Pillow clips these to 0..255 when converting, which turns most 16-bit
        # pictures white; scale the 16-bit range down instead. "I" is treated as
        # 16-bit because that is how Pillow has loaded 16-bit PNG/TIFF data.
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        # Pillow's convention for float images is the 0..255 scale, clipped.
        return image.convert("L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Pillow has no direct La -> RGBA conversion; un-premultiply through LA.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s); urllib would also follow one to ftp."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise urllib.error.URLError(
                f"redirect to {newurl!r} refused: only {' and '.join(_URL_SCHEMES)} are allowed"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


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
        has no effect.
        """
        if not isinstance(array, np.ndarray):
            raise ImageLoadError(
                f"from_array() expects a numpy.ndarray ({_ARRAY_LAYOUTS}), got "
                f"{type(array).__name__}",
                source=f"<{type(array).__name__}>",
            )
        source = f"<array shape={array.shape} dtype={array.dtype}>"
        layout_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
        if array.dtype != np.uint8 or not layout_ok:
            raise ImageLoadError(
                f"array must be {_ARRAY_LAYOUTS}, got shape={array.shape} dtype={array.dtype}",
                source=source,
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ImageLoadError(
                f"array image is empty: height and width must be > 0, got shape={array.shape}",
                source=source,
            )
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
            payload = _split_data_uri(data, source=source)
        decoded = _decode_base64(payload, source=source)
        return cls(kind="base64", max_pixels=max_pixels, _base64=data, _data=decoded)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_URL_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> ImagePart:
        """An http(s) URL, downloaded each time the image is loaded or hashed.

        ``timeout`` is in seconds, for connecting and for each read; the
        download stops as soon as more than ``max_bytes`` have arrived.
        """
        if not isinstance(url, str):
            raise ImageLoadError(
                f"from_url() expects a str URL, got {type(url).__name__}",
                source=f"<{type(url).__name__}>",
            )
        try:
            parsed = urllib.parse.urlsplit(url)
        except ValueError as exc:
            raise ImageLoadError(f"image URL is malformed ({exc}): {url!r}", source=url) from exc
        scheme = parsed.scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise ImageLoadError(
                f"image URL scheme must be one of {', '.join(_URL_SCHEMES)}, got "
                f"{scheme or '(none)'!r} in {url!r}; use from_path() for local files",
                source=url,
            )
        if not parsed.netloc:
            raise ImageLoadError(f"image URL has no host: {url!r}", source=url)
        return cls(
            kind="url",
            max_pixels=max_pixels,
            _location=url,
            _timeout=_check_timeout(timeout),
            _max_bytes=_check_positive_int("max_bytes", max_bytes),
        )

    @classmethod
    def from_message_content(cls, block: Mapping[str, object]) -> ImagePart:
        """Build an image from a chat-message block such as ``{"type": "image", "url": ...}``.

        Exactly one of the keys ``path``, ``url``, ``base64`` or ``image`` (a
        PIL image) must be present; a ``url`` that is a ``data:`` URI is read as
        base64. This is the inverse of :meth:`to_message_content`.
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

    def load(self) -> Image.Image:
        """Read and decode the image into a new 8-bit RGB PIL image.

        EXIF orientation is applied, an animated image gives its first frame,
        and transparency is composited on white. Raises ImageLoadError if the
        source cannot be read or decoded, or has more than ``max_pixels`` pixels.
        """
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; max_pixels is
        # the limit that applies here, so the warning is noise. catch_warnings
        # swaps the process-wide filter list, the only way the stdlib offers.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                return self._load()
            except ImageLoadError:
                raise
            # Corrupt files make Pillow's plugins raise almost anything (OSError,
            # SyntaxError, struct.error, IndexError...), so catch them all here.
            except Exception as exc:
                raise self._decode_error(exc) from exc

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
            try:
                with open(str(self._location), "rb") as file:
                    while chunk := file.read(1024 * 1024):
                        digest.update(chunk)
            except (OSError, ValueError) as exc:
                raise self._decode_error(exc) from exc
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
        mime = _sniff_mime(self._data) if self._data is not None else None
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
        return (self.kind, self.max_pixels, self._timeout, self._max_bytes, payload)

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

    # -- internals ----------------------------------------------------------

    def _encoded_bytes(self) -> bytes:
        if self.kind == "url":
            return self._download()
        assert self._data is not None  # __post_init__ guarantees it for bytes and base64
        return self._data

    def _load(self) -> Image.Image:
        if self.kind == "pil":
            assert self._image is not None
            return self._convert(self._image)
        if self.kind == "array":
            assert self._array is not None
            return self._convert(Image.fromarray(self._array))
        # Image.open only parses the header; _convert checks the size before
        # any pixels are decoded. The first frame of an animation is current.
        with self._open_encoded() as image:
            return self._convert(image)

    def _open_encoded(self) -> Image.Image:
        if self.kind == "path":
            return Image.open(str(self._location))
        return Image.open(io.BytesIO(self._encoded_bytes()))

    def _convert(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageLoadError(
                f"image is {width} x {height} = {width * height} pixels, over the limit of "
                f"{self.max_pixels}; pass max_pixels= to raise it",
                source=self.describe(),
            )
        # Decode now so that truncated data fails here rather than lazily later.
        image.load()
        oriented = ImageOps.exif_transpose(image)
        # exif_transpose always returns a new image, so it can be returned as is.
        return oriented if oriented.mode == "RGB" else _to_rgb(oriented)

    def _decode_error(self, exc: BaseException) -> ImageLoadError:
        source = self.describe()
        what = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, Image.DecompressionBombError):
            message = (
                f"image is larger than Pillow will decode ({exc}); the limit here is "
                f"max_pixels={self.max_pixels}: to load it, pass a larger max_pixels= and "
                "raise PIL.Image.MAX_IMAGE_PIXELS"
            )
        elif isinstance(exc, FileNotFoundError):
            message = (
                f"image file not found: {source!r} (current directory {os.getcwd()!r}); "
                "check the path"
            )
        elif isinstance(exc, IsADirectoryError):
            message = f"image path is a directory, not a file: {source!r}; pass an image file"
        elif isinstance(exc, PermissionError):
            message = f"permission denied reading image file {source!r}; check its permissions"
        elif isinstance(exc, UnidentifiedImageError):
            message = (
                f"{source} is not an image Pillow can read (unrecognised format); pass a "
                "PNG, JPEG, GIF, WEBP, BMP or TIFF image"
            )
            if self.kind == "path" and _file_size(str(self._location)) == 0:
                message = f"image file is empty (0 bytes): {source!r}; pass a valid image file"
        elif isinstance(exc, ValueError) and "closed image" in str(exc):
            message = (
                f"the PIL image {source} was closed before it was loaded; keep it open "
                "until generation is done, or pass image.copy()"
            )
        else:
            message = (
                f"could not read or decode image {source} ({what}); the data may be "
                "truncated or corrupt, or in a format Pillow cannot decode"
            )
        return ImageLoadError(message, source=source)

    def _download(self) -> bytes:
        url = str(self._location)
        request = urllib.request.Request(
            url, headers={"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
        )
        opener = urllib.request.build_opener(_HttpOnlyRedirects)
        too_big = (
            f"download of {url} is over the limit of max_bytes={self._max_bytes} bytes; "
            "pass a larger max_bytes= to allow it"
        )
        try:
            with opener.open(request, timeout=self._timeout) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self._max_bytes:
                    raise ImageLoadError(
                        f"{too_big} (the server announced {declared} bytes)", source=url
                    )
                chunks: list[bytes] = []
                received = 0
                # read1 returns what one socket read gave, so an oversized body
                # is abandoned as soon as the limit is passed, not once complete.
                while chunk := response.read1(_DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > self._max_bytes:
                        raise ImageLoadError(
                            f"{too_big} (stopped after receiving {received} bytes)", source=url
                        )
                    chunks.append(chunk)
        except ImageLoadError:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()
            raise ImageLoadError(
                f"HTTP error {exc.code} {exc.reason} downloading image {url}; check the URL",
                source=url,
            ) from exc
        except (TimeoutError, urllib.error.URLError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError):
                message = (
                    f"timed out after {self._timeout:g} s downloading image {url}; check the "
                    "server or pass a larger timeout="
                )
            else:
                message = f"could not download image {url}: {reason}; check the URL and network"
            raise ImageLoadError(message, source=url) from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ImageLoadError(
                f"could not download image {url} ({type(exc).__name__}: {exc}); check the URL "
                "and network",
                source=url,
            ) from exc
        data = b"".join(chunks)
        if not data:
            raise ImageLoadError(
                f"downloaded 0 bytes from {url}; the URL does not serve an image", source=url
            )
        return data


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except (OSError, ValueError):
        return None
