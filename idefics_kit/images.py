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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import http.client
import io
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal, TypeAlias

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
_MESSAGE_SOURCE_KEYS = ("path", "url", "base64", "image")
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

# URLs.
_URL_SCHEMES = ("http", "https")
_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TOTAL_TIMEOUT_FACTOR = 3
"""The whole download of a URL, redirects included, must finish within this many ``timeout``s."""
_DOWNLOAD_CHUNK = 64 * 1024
_REQUEST_HEADERS = {
    "User-Agent": "idefics-kit (Python http.client)",
    "Accept": "image/*,*/*;q=0.5",
    "Accept-Encoding": "identity",
    "Connection": "close",
}
_OCTET_STREAM_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
_HOST_PATTERN = re.compile(r"[a-z0-9._:%-]+")
_BAD_URL_CHARACTER = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_REQUEST_TARGET_SAFE = "/?&=%:@!$'()*+,;~-._[]"
# Cloud instance metadata services: link-local or private already, except the
# Azure and Oracle ones, which are refused by name.
_METADATA_ADDRESSES = frozenset(
    {
        "169.254.169.254",  # AWS, GCP, Azure, DigitalOcean, OpenStack...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure wire server
    }
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


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


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"{name} must be True or False, got {value!r}", value)
    return value


# -- base64 ---------------------------------------------------------------------


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


# -- arrays -----------------------------------------------------------------------


def _array_problem(array: npt.NDArray[Any]) -> str | None:
    """What is wrong with an array given to from_array, or None."""
    layout_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype == np.uint8 and layout_ok:
        if array.shape[0] == 0 or array.shape[1] == 0:
            return f"array image is empty: height and width must be > 0, got shape={array.shape}"
        return None
    message = f"array must be {_ARRAY_LAYOUTS}, got shape={array.shape} dtype={array.dtype}"
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


def _file_error(path: str, exc: BaseException) -> ImageLoadError:
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


def _open_file(path: str) -> IO[bytes]:
    """Open ``path`` for reading if it is a non-empty regular file, else raise ImageLoadError."""
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise _file_error(path, exc) from exc
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


# -- URLs: parsing and the address policy --------------------------------------------


class _URLProblem(Exception):
    """Why a URL cannot be fetched, found without any network access."""


@dataclass(frozen=True, slots=True)
class _Target:
    """One URL to request: checked, with the host in ASCII and the port filled in."""

    url: str
    scheme: str
    host: str
    port: int
    path: str


@dataclass(frozen=True, slots=True)
class _Redirect:
    location: str


def _split_url(url: str) -> _Target:
    """Check an http(s) URL and split it; raise _URLProblem saying what is wrong."""
    bad = _BAD_URL_CHARACTER.search(url)
    if bad is not None:
        kind = "lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "control character"
        raise _URLProblem(
            f"contains the {kind} U+{ord(bad.group()):04X} at index {bad.start()}; "
            "percent-encode it"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _URLProblem(f"is malformed ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in _URL_SCHEMES:
        raise _URLProblem(
            f"scheme must be one of {', '.join(_URL_SCHEMES)}, got {scheme or '(none)'!r}"
        )
    if not parts.hostname:
        raise _URLProblem("has no host")
    if port == 0:
        raise _URLProblem("has port 0; ports are 1 to 65535")
    default_port = 443 if scheme == "https" else 80
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Non-ASCII and spaces are percent-encoded; existing escapes are kept.
    request_target = urllib.parse.quote(request_target, safe=_REQUEST_TARGET_SAFE)
    return _Target(url, scheme, _ascii_host(parts.hostname), port or default_port, request_target)


def _ascii_host(host: str) -> str:
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise _URLProblem(f"has an invalid host name {host!r} ({exc})") from exc
    if not _HOST_PATTERN.fullmatch(host):
        raise _URLProblem(f"has an invalid host name {host!r}")
    return host


def _embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _address_problem(address: str) -> str | None:
    """Why ``address`` is not fetched by default, or None for a public internet address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if str(ip) in _METADATA_ADDRESSES:
        return "a cloud metadata service"
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        problem = _address_problem(str(embedded))
        if problem is not None:
            return f"{problem}, embedded in an IPv6 address"
    for name, flagged in (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if flagged:
            return name
    return None if ip.is_global else "not globally routable"


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in resolver order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# -- URLs: connections ------------------------------------------------------------------


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """Connect to an address that has passed the checks (the tests fake the network here)."""
    return socket.create_connection((address, port), timeout=timeout)


def _connect_any(
    addresses: Sequence[str], port: int, timeout: float, deadline: float
) -> socket.socket:
    """A socket connected to the first of ``addresses`` that answers."""
    error: OSError = ConnectionError("no address to connect to")
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the download's time ran out while connecting")
        try:
            return _open_socket(address, port, min(timeout, remaining))
        except OSError as exc:
            error = exc
    raise error


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """The system's CAs, certificate and host name verification on."""
    return ssl.create_default_context()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked addresses, never resolving the host name again.

    Checking an address and then letting the connection resolve the name
    again would let DNS answer differently the second time (DNS rebinding).
    The Host header still names the host of the URL.
    """

    def __init__(
        self, host: str, port: int, *, addresses: Sequence[str], timeout: float, deadline: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = tuple(addresses)
        self._deadline = deadline
        self._timeout = timeout
        self.opened: socket.socket | None = None
        """The connected socket; unlike ``sock`` it stays set while the response is read."""

    def connect(self) -> None:
        self.sock = self.opened = _connect_any(
            self._addresses, self.port, self._timeout, self._deadline
        )


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Like :class:`_PinnedHTTPConnection`, over TLS.

    SNI and certificate verification use the host name of the URL, not the
    address connected to.
    """

    def __init__(
        self, host: str, port: int, *, addresses: Sequence[str], timeout: float, deadline: float
    ) -> None:
        context = _tls_context()
        super().__init__(host, port, timeout=timeout, context=context)
        self._addresses = tuple(addresses)
        self._deadline = deadline
        self._timeout = timeout
        self._tls = context
        self.opened: socket.socket | None = None
        """The connected socket; unlike ``sock`` it stays set while the response is read."""

    def connect(self) -> None:
        raw = _connect_any(self._addresses, self.port, self._timeout, self._deadline)
        try:
            tls = self._tls.wrap_socket(
                raw, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        # Set before the handshake so that the watchdog can interrupt it.
        self.sock = self.opened = tls
        tls.do_handshake()


_Pinned: TypeAlias = _PinnedHTTPConnection | _PinnedHTTPSConnection


def _connection(
    target: _Target, addresses: Sequence[str], timeout: float, deadline: float
) -> _Pinned:
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    return kind(target.host, target.port, addresses=addresses, timeout=timeout, deadline=deadline)


class _Watchdog:
    """Shuts a connection's socket down when the download's overall deadline passes.

    Per-read timeouts cannot stop a server that sends a byte just often
    enough; this bounds the whole exchange, headers and TLS handshake included.
    """

    def __init__(self, connection: _Pinned, deadline: float) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._stopped = False
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._stopped = True
        self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.fired = True
            sock = self._connection.opened
            if sock is not None:
                # The plain socket method: it only touches the file descriptor,
                # so it is safe while another thread is inside a TLS read.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _content_type_problem(header: str | None) -> str | None:
    """The media type of a Content-Type header that is not an image type, or None."""
    if header is None or not header.strip():
        return None
    mime = header.split(";", 1)[0].strip().lower()
    if mime.startswith("image/") or mime in _OCTET_STREAM_TYPES:
        return None
    return mime


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
                f"from_array() expects a numpy.ndarray ({_ARRAY_LAYOUTS}), got "
                f"{type(array).__name__}",
                source=f"<{type(array).__name__}>",
            )
        problem = _array_problem(array)
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
        try:
            _split_url(url)
        except _URLProblem as exc:
            if str(exc).startswith("scheme"):
                message = f"image URL {exc} in {url!r}; use from_path() for local files"
            else:
                message = f"image URL {exc}: {url!r}"
            raise ImageLoadError(message, source=url) from exc
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

    def load(self) -> Image.Image:
        """Read and decode the image into a new 8-bit RGB PIL image.

        EXIF orientation is applied, an animated image gives its first frame,
        and transparency is composited on white. Raises ImageLoadError if the
        source cannot be read or decoded, is not in a decoded format (PNG,
        JPEG, GIF, WEBP, BMP, TIFF, PPM, ICO, AVIF), or has more than
        ``max_pixels`` pixels.
        """
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
            path = str(self._location)
            with _open_file(path) as file:
                try:
                    while chunk := file.read(1024 * 1024):
                        digest.update(chunk)
                except OSError as exc:
                    raise _file_error(path, exc) from exc
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
        with self._open_stream() as stream:
            try:
                opened = _open_image(stream)
            except UnidentifiedImageError as exc:
                stream.seek(0)
                raise self._unidentified(stream.read(_SNIFF_BYTES)) from exc
            # Image.open only parsed the header; _convert checks the size before
            # any pixels are decoded. The first frame of an animation is current.
            with opened:
                return self._convert(opened)

    def _open_stream(self) -> IO[bytes]:
        if self.kind == "path":
            return _open_file(str(self._location))
        return io.BytesIO(self._encoded_bytes())

    def _convert(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(
                f"image {self.describe()!r} has no pixels ({width} x {height})",
                source=self.describe(),
            )
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

    def _unidentified(self, head: bytes) -> ImageLoadError:
        source = self.describe()
        what = _unsupported_format(head)
        mime = _sniff_mime(head)
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

    def _decode_error(self, exc: BaseException) -> ImageLoadError:
        source = self.describe()
        if self.kind == "path" and isinstance(exc, (FileNotFoundError, PermissionError)):
            return _file_error(source, exc)
        if isinstance(exc, Image.DecompressionBombError):
            message = (
                f"image is larger than Pillow will decode ({exc}); the limit here is "
                f"max_pixels={self.max_pixels}: to load it, pass a larger max_pixels= and "
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

    # -- internals: downloading ----------------------------------------------------

    def _download(self) -> bytes:
        """The body of the URL, following at most five redirects, each one checked."""
        url = str(self._location)
        deadline = time.monotonic() + self._timeout * _TOTAL_TIMEOUT_FACTOR
        try:
            target = _split_url(url)
        except _URLProblem as exc:  # from_url checked it; only a hand-built part gets here
            raise ImageLoadError(f"image URL {exc}: {url!r}", source=url) from exc
        for redirects in range(_MAX_REDIRECTS + 1):
            outcome = self._fetch(target, deadline)
            if isinstance(outcome, bytes):
                return outcome
            if redirects == _MAX_REDIRECTS:
                raise ImageLoadError(
                    f"image URL {url} redirected more than {_MAX_REDIRECTS} times (the last "
                    f"redirect pointed to {outcome.location!r}); check the URL",
                    source=url,
                )
            target = self._redirect_target(target, outcome.location)
        raise AssertionError("unreachable")  # pragma: no cover

    def _where(self, target: _Target) -> str:
        if target.url == self._location:
            return target.url
        return f"{target.url} (redirected from {self._location})"

    def _redirect_target(self, current: _Target, location: str) -> _Target:
        """The checked target of a redirect (its addresses are checked when fetched)."""
        new_url = location
        try:
            new_url = urllib.parse.urljoin(current.url, location)
            return _split_url(new_url)
        except (_URLProblem, ValueError) as exc:
            raise ImageLoadError(
                f"redirect to {new_url!r} refused: the URL {exc} (redirected from "
                f"{current.url}); only {' and '.join(_URL_SCHEMES)} URLs with a host are followed",
                source=str(self._location),
            ) from exc

    def _checked_addresses(self, target: _Target) -> list[str]:
        """The addresses of the target's host, refused unless the policy allows all of them."""
        url = str(self._location)
        try:
            addresses = _resolve(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise ImageLoadError(
                f"could not resolve the host {target.host!r} of image URL {self._where(target)} "
                f"({exc}); check the URL and network",
                source=url,
            ) from exc
        if not addresses:
            raise ImageLoadError(
                f"the host {target.host!r} of image URL {self._where(target)} resolves to no "
                "address; check the URL",
                source=url,
            )
        for address in [] if self.allow_private_network else addresses:
            problem = _address_problem(address)
            if problem is not None:
                raise ImageLoadError(
                    f"refusing to fetch {self._where(target)}: it resolves to a private/loopback "
                    f"address ({target.host} -> {address}: {problem}); by default only public "
                    "internet addresses are fetched, so that a URL from a user cannot reach "
                    "internal services; pass allow_private_network=True for trusted setups",
                    source=url,
                )
        return addresses

    def _fetch(self, target: _Target, deadline: float) -> bytes | _Redirect:
        """One request: the body, or where a redirect points."""
        addresses = self._checked_addresses(target)
        connection = _connection(target, addresses, self._timeout, deadline)
        try:
            with _Watchdog(connection, deadline) as watchdog:
                try:
                    outcome = self._exchange(connection, target)
                except (ImageLoadError, OSError, http.client.HTTPException, ValueError) as exc:
                    # Once the deadline has cut the connection, any error is the timeout.
                    if isinstance(exc, ImageLoadError) and not watchdog.fired:
                        raise
                    raise self._network_error(exc, target, watchdog.fired) from exc
                if watchdog.fired:
                    raise self._network_error(TimeoutError(), target, fired=True)
        finally:
            connection.close()
        if isinstance(outcome, bytes) and not outcome:
            raise ImageLoadError(
                f"downloaded 0 bytes from {self._where(target)}; the URL does not serve an image",
                source=str(self._location),
            )
        return outcome

    def _exchange(self, connection: _Pinned, target: _Target) -> bytes | _Redirect:
        connection.request("GET", target.path, headers=_REQUEST_HEADERS)
        with connection.getresponse() as response:
            return self._handle_response(response, target)

    def _handle_response(
        self, response: http.client.HTTPResponse, target: _Target
    ) -> bytes | _Redirect:
        url = str(self._location)
        status = f"HTTP {response.status} {response.reason}"
        if response.status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location or not location.strip():
                raise ImageLoadError(
                    f"{self._where(target)} answered {status} without a Location header; "
                    "check the URL",
                    source=url,
                )
            return _Redirect(location.strip())
        if not 200 <= response.status < 300:
            raise ImageLoadError(
                f"HTTP error {response.status} {response.reason} downloading image "
                f"{self._where(target)}; check the URL",
                source=url,
            )
        content_type = response.getheader("Content-Type")
        mime = _content_type_problem(content_type)
        if mime is not None:
            raise ImageLoadError(
                f"{self._where(target)} has Content-Type {mime!r}, not an image; the server "
                "must send image/* or application/octet-stream (is this the URL of a web page "
                "rather than of the image itself?)",
                source=url,
            )
        return self._read_body(response, target)

    def _read_body(self, response: http.client.HTTPResponse, target: _Target) -> bytes:
        too_big = (
            f"download of {self._where(target)} is over the limit of max_bytes="
            f"{self._max_bytes} bytes; pass a larger max_bytes= to allow it"
        )
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > self._max_bytes:
            raise ImageLoadError(
                f"{too_big} (the server announced {declared} bytes)", source=str(self._location)
            )
        chunks: list[bytes] = []
        received = 0
        # read1 returns what one socket read gave, so an oversized body is
        # abandoned as soon as the limit is passed, not once complete.
        while chunk := response.read1(_DOWNLOAD_CHUNK):
            received += len(chunk)
            if received > self._max_bytes:
                raise ImageLoadError(
                    f"{too_big} (stopped after receiving {received} bytes)",
                    source=str(self._location),
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _network_error(self, exc: BaseException, target: _Target, fired: bool) -> ImageLoadError:
        where = self._where(target)
        if fired:
            total = self._timeout * _TOTAL_TIMEOUT_FACTOR
            message = (
                f"timed out: downloading image {where} took longer than {total:g} s "
                f"({_TOTAL_TIMEOUT_FACTOR} x timeout={self._timeout:g} s) in all; check the "
                "server or pass a larger timeout="
            )
        elif isinstance(exc, TimeoutError):
            message = (
                f"timed out after {self._timeout:g} s downloading image {where}; check the "
                "server or pass a larger timeout="
            )
        elif isinstance(exc, ssl.SSLCertVerificationError):
            message = (
                f"TLS certificate verification failed for {where} ({exc.verify_message}); the "
                f"server must present a valid certificate for {target.host!r}"
            )
        else:
            message = (
                f"could not download image {where} ({type(exc).__name__}: {exc}); check the "
                "URL and network"
            )
        return ImageLoadError(message, source=str(self._location))
