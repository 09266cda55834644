"""Reading and decoding image data safely, for :class:`~idefics_kit.images.ImagePart`.

Opening files (regular files only, never blocking on a pipe), decoding
base64 text and ``data:`` URIs, checking NumPy arrays, recognising formats
from their first bytes, decoding only an allow-list of common raster formats
with Pillow, checking the pixel count from the header before any pixels are
decoded, and converting whatever Pillow gives to a new 8-bit RGB image with
any transparency composited on white.

Every failure raises (or returns, for the caller to raise)
:class:`~idefics_kit.errors.ImageLoadError` with the ``source`` it is given.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import threading
import warnings
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from idefics_kit.errors import ImageLoadError

__all__ = [
    "ARRAY_LAYOUTS",
    "array_problem",
    "checked_rgb",
    "decode",
    "decode_base64",
    "decode_error",
    "file_error",
    "open_file",
    "sniff_mime",
    "split_data_uri",
]

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
ARRAY_LAYOUTS = "HxWx3 uint8 (RGB), HxWx4 uint8 (RGBA) or HxW uint8 (greyscale)"

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

# The only Pillow formats decoded from files, bytes and downloads. Pillow knows
# some 40 formats, several of them rare and with their own parsers (and EPS
# runs Ghostscript); images from users need none of them. "JPEG" includes
# MPO (multi-picture JPEGs from phones); "HEIF" only counts when a plugin such
# as pillow-heif registered it.
_DECODED_FORMATS = (
    "PNG",
    "JPEG",
    "GIF",
    "WEBP",
    "BMP",
    "DIB",
    "TIFF",
    "PPM",
    "ICO",
    "AVIF",
    "HEIF",
)
_FORMATS_TEXT = "PNG, JPEG, GIF, WEBP, BMP, TIFF, PPM, ICO or AVIF"
_SNIFF_BYTES = 1024
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_HEIF_BRANDS |= {b"mif1", b"msf1"}
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

# Pillow warns about big images before max_pixels is checked; catch_warnings
# swaps process-wide state, so the threads decoding images take turns.
_WARNINGS_LOCK = threading.Lock()

# Files: O_NONBLOCK so that opening a named pipe cannot block (it is then
# refused as not a regular file); it does not change reads of regular files.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)


def sniff_mime(data: bytes) -> str | None:
    """The media type of a common image format that ``data`` starts with, or None."""
    for magic, offset, mime in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if mime == "image/webp" and not data.startswith(b"RIFF"):
                continue
            return mime
    return None


# -- base64 ---------------------------------------------------------------------


def decode_base64(text: str, *, source: str) -> bytes:
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


def split_data_uri(text: str, *, source: str) -> str:
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


# -- arrays -----------------------------------------------------------------------


def array_problem(array: npt.NDArray[Any]) -> str | None:
    """What is wrong with an array given to from_array, or None."""
    layout_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype == np.uint8 and layout_ok:
        if array.shape[0] == 0 or array.shape[1] == 0:
            return f"array image is empty: height and width must be > 0, got shape={array.shape}"
        return None
    message = f"array must be {ARRAY_LAYOUTS}, got shape={array.shape} dtype={array.dtype}"
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        if array.size and not np.isfinite(array).all():
            message += " containing NaN or infinite values"
        message += (
            "; float pixels are not guessed at (0..1 or 0..255?): convert them yourself, e.g. "
            "(np.nan_to_num(a).clip(0, 1) * 255).round().astype(np.uint8)"
        )
    return message


# -- files ------------------------------------------------------------------------


def _file_problem(path: str, info: os.stat_result) -> str | None:
    if stat.S_ISDIR(info.st_mode):
        return f"image path is a directory, not a file: {path!r}; pass an image file"
    if not stat.S_ISREG(info.st_mode):
        return (
            f"image path {path!r} is not a regular file (a device, pipe or socket); pass an "
            "image file"
        )
    if info.st_size == 0:
        return f"image file is empty (0 bytes): {path!r}; pass a valid image file"
    return None


def file_error(path: str, exc: BaseException) -> ImageLoadError:
    """The ImageLoadError for ``exc``, raised while opening the image file ``path``."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        message = (
            f"image file not found: {path!r} (current directory {os.getcwd()!r}); check the path"
        )
    elif isinstance(exc, IsADirectoryError) or os.path.isdir(path):
        message = f"image path is a directory, not a file: {path!r}; pass an image file"
    elif isinstance(exc, PermissionError):
        message = f"permission denied reading image file {path!r}; check its permissions"
    elif isinstance(exc, UnicodeError):
        message = f"image path {path!r} cannot be encoded for the file system ({exc})"
    else:
        message = f"could not open image file {path!r} ({type(exc).__name__}: {exc})"
    return ImageLoadError(message, source=path)


def open_file(path: str) -> IO[bytes]:
    """Open ``path`` for reading if it is a non-empty regular file, else raise ImageLoadError."""
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise file_error(path, exc) from exc
    try:
        problem = _file_problem(path, os.fstat(descriptor))
        if problem is not None:
            raise ImageLoadError(problem, source=path)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


# -- decoding ---------------------------------------------------------------------


def _decoded_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin once; later calls return at once
    return tuple(name for name in _DECODED_FORMATS if name in Image.OPEN)


def _open_image(stream: IO[bytes]) -> Image.Image:
    """Parse the header of an encoded image in one of the decoded formats."""
    # Pillow warns about images over PIL.Image.MAX_IMAGE_PIXELS before
    # max_pixels can be checked; max_pixels is the limit that applies here.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(stream, formats=_decoded_formats())


def _leading_text(head: bytes) -> str | None:
    """``head`` decoded, if it is the start of a UTF-8 text file."""
    sample = head.removeprefix(b"\xef\xbb\xbf")
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:
            return None
        text = sample[: exc.start].decode("utf-8")  # a character cut off at the end
    if not text or not all(char.isprintable() or char in "\t\r\n\f" for char in text):
        return None
    return text


def _unsupported_format(head: bytes) -> str | None:
    """Name a well-known format that is not decoded, from a file's first bytes."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return (
                "a HEIC/HEIF image (the iPhone photo format), which needs a plugin: convert it "
                "to JPEG or PNG, or install pillow-heif and call "
                "pillow_heif.register_heif_opener()"
            )
        if brand in _AVIF_BRANDS:
            return "an AVIF image this Pillow build cannot decode: convert it to PNG or JPEG"
        return "a video or other ISO media file, not a still image: pass a PNG or JPEG image"
    if head.startswith(b"%PDF-"):
        return "a PDF document, not an image: render the page to PNG first"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "a PostScript/EPS file, which is not decoded here: convert it to PNG first"
    text = _leading_text(head)
    if text is None:
        return None
    lowered = text.lower()
    if "<svg" in lowered:
        return (
            "an SVG (vector) image, which is not rasterised here: render it to PNG first "
            "(e.g. with cairosvg)"
        )
    if "<html" in lowered or "<!doctype html" in lowered:
        return "an HTML page: check that the path or URL points at the image itself"
    return "text, not an image: pass the image file itself"


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


# -- checking and decoding -------------------------------------------------------------


def checked_rgb(image: Image.Image, *, max_pixels: int, source: str) -> Image.Image:
    """``image`` decoded into a new 8-bit RGB image with EXIF orientation applied.

    Raise ImageLoadError if it has no pixels or more than ``max_pixels``; that
    is checked from the size alone, before any pixels are decoded.
    """
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(
            f"image {source!r} has no pixels ({width} x {height})",
            source=source,
        )
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of "
            f"{max_pixels}; pass max_pixels= to raise it",
            source=source,
        )
    # Decode now so that truncated data fails here rather than lazily later.
    image.load()
    oriented = ImageOps.exif_transpose(image)
    # exif_transpose always returns a new image, so it can be returned as is.
    return oriented if oriented.mode == "RGB" else _to_rgb(oriented)


def decode(stream: IO[bytes], *, max_pixels: int, source: str) -> Image.Image:
    """The encoded image in ``stream`` (its first frame) decoded as :func:`checked_rgb` does.

    Only the formats of the allow-list are opened; for anything else the
    ImageLoadError names the format when its first bytes show it.
    """
    try:
        opened = _open_image(stream)
    except UnidentifiedImageError as exc:
        stream.seek(0)
        raise _unidentified(stream.read(_SNIFF_BYTES), source=source) from exc
    # Image.open only parsed the header; checked_rgb checks the size before
    # any pixels are decoded. The first frame of an animation is current.
    with opened:
        return checked_rgb(opened, max_pixels=max_pixels, source=source)


def _unidentified(head: bytes, *, source: str) -> ImageLoadError:
    what = _unsupported_format(head)
    mime = sniff_mime(head)
    if mime is not None:
        message = (
            f"could not read image {source!r}: it starts like {mime} data but its header "
            "cannot be parsed; the data is truncated or corrupt"
        )
    elif what is not None:
        message = f"{source!r} is not an image Pillow can read here: it is {what}"
    else:
        message = (
            f"{source!r} is not an image Pillow can read (unrecognised format); pass a "
            f"{_FORMATS_TEXT} image"
        )
    return ImageLoadError(message, source=source)


def decode_error(exc: BaseException, *, max_pixels: int, source: str) -> ImageLoadError:
    """The ImageLoadError for ``exc``, raised by Pillow while decoding the image ``source``."""
    if isinstance(exc, Image.DecompressionBombError):
        message = (
            f"image is larger than Pillow will decode ({exc}); the limit here is "
            f"max_pixels={max_pixels}: to load it, pass a larger max_pixels= and "
            "raise PIL.Image.MAX_IMAGE_PIXELS"
        )
    elif isinstance(exc, ValueError) and "closed image" in str(exc):
        message = (
            f"the PIL image {source} was closed before it was loaded; keep it open "
            "until generation is done, or pass image.copy()"
        )
    else:
        message = (
            f"could not read or decode image {source!r} ({type(exc).__name__}: {exc}); the "
            "data may be truncated or corrupt, or in a format Pillow cannot decode"
        )
    return ImageLoadError(message, source=source)
