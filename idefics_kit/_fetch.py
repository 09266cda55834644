"""Downloading an http(s) URL safely, for :meth:`~idefics_kit.images.ImagePart.from_url`.

:func:`check_url` validates a URL without any network access (for building an
image part); :func:`download` fetches its body. Both raise
:class:`~idefics_kit.errors.ImageLoadError` whose ``source`` is the URL.

URLs often come from users of a web service, so a download is defensive: by
default the host must resolve only to public internet addresses (loopback,
private, link-local, multicast, reserved and cloud-metadata addresses are
refused before connecting, for the first URL and for every redirect); the
connection goes to the checked addresses, never resolving the name again; at
most five redirects are followed, each to http(s) only; the response must have
an image (or octet-stream) Content-Type; the body is abandoned as soon as it is
over ``max_bytes``; and the whole download, redirects included and name
resolution too, must finish within three times ``timeout`` (or by the caller's
``deadline``, when sooner). A :class:`Cancellation` stops downloads in progress
from another thread (a server cancels those of a client that left).

A refusal says which host was refused and why, never the address it resolved
to: for an internal host name that would tell the client an internal address
(the address goes to the debug log).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import logging
import queue
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from idefics_kit._quote import QUOTE_CHARS, short_repr
from idefics_kit.errors import ImageLoadError

__all__ = ["Cancellation", "check_url", "download"]

logger = logging.getLogger("idefics_kit.fetch")

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


class Cancellation:
    """A switch that stops downloads in progress, from any thread.

    Pass it to :func:`download`; :meth:`cancel` shuts the connections of
    every download using it and makes them (and later ones) raise
    :class:`~idefics_kit.errors.ImageLoadError` saying they were cancelled.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._hooks: set[Callable[[], None]] = set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Stop every download using this switch; idempotent."""
        with self._lock:
            self._cancelled = True
            hooks = list(self._hooks)
        for hook in hooks:
            hook()

    def _watch(self, hook: Callable[[], None]) -> bool:
        """Call ``hook`` on cancel; False (and no hook) when already cancelled."""
        with self._lock:
            if self._cancelled:
                return False
            self._hooks.add(hook)
            return True

    def _unwatch(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks.discard(hook)


class _Cancelled(Exception):
    """The download's :class:`Cancellation` was set."""


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
    """Every address ``host`` resolves to, in resolver order (the tests fake DNS here)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_POLL_SECONDS = 0.05


def _resolve_by(
    host: str, port: int, deadline: float, cancellation: Cancellation | None
) -> list[str]:
    """:func:`_resolve` within ``deadline``: a resolver that hangs is left behind, not waited for.

    ``getaddrinfo`` cannot be interrupted, so it runs in a daemon thread and
    its answer is awaited only until the deadline (or a cancellation).
    """
    answers: queue.SimpleQueue[list[str] | BaseException] = queue.SimpleQueue()

    def work() -> None:
        try:
            answers.put(_resolve(host, port))
        except BaseException as exc:  # handed to the waiting thread
            answers.put(exc)

    threading.Thread(target=work, name="idefics-kit-dns", daemon=True).start()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the download's time ran out while resolving the host name")
        if cancellation is not None and cancellation.cancelled:
            raise _Cancelled
        try:
            answer = answers.get(timeout=min(remaining, _POLL_SECONDS))
        except queue.Empty:
            continue
        if isinstance(answer, BaseException):
            raise answer
        return answer


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
        self.watchdog: _Watchdog | None = None

    def connect(self) -> None:
        self.sock = _connect_any(self._addresses, self.port, self._timeout, self._deadline)
        _opened(self, self.sock)


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
        self.watchdog: _Watchdog | None = None

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
        self.sock = tls
        _opened(self, tls)
        tls.do_handshake()


_Pinned: TypeAlias = _PinnedHTTPConnection | _PinnedHTTPSConnection


def _opened(connection: _Pinned, sock: socket.socket) -> None:
    """Record the connected socket; shut it at once if the watchdog fired while connecting."""
    watchdog = connection.watchdog
    if watchdog is None:
        connection.opened = sock
        return
    with watchdog.lock:
        connection.opened = sock
        fired = watchdog.fired
    if fired:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


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

    def __init__(
        self, connection: _Pinned, deadline: float, cancellation: Cancellation | None
    ) -> None:
        self._connection = connection
        self._cancellation = cancellation
        self.lock = threading.Lock()
        connection.watchdog = self
        self._stopped = False
        self.fired = False
        self.cancelled = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        if self._cancellation is not None and not self._cancellation._watch(self._cancel):
            self._cancel()
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.lock:
            self._stopped = True
        self._timer.cancel()
        if self._cancellation is not None:
            self._cancellation._unwatch(self._cancel)

    def _cancel(self) -> None:
        self._fire(cancelled=True)

    def _fire(self, *, cancelled: bool = False) -> None:
        with self.lock:
            if self._stopped or self.fired:
                return
            self.fired = True
            self.cancelled = cancelled
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


def _short(url: str) -> str:
    """A URL for a message: whole when short, else its first characters and ``...``."""
    return url if len(url) <= 2 * QUOTE_CHARS else url[:QUOTE_CHARS] + "..."


# -- checking and downloading ------------------------------------------------------------


def check_url(url: str) -> str:
    """Return ``url`` if it is an http(s) URL that can be fetched, found without network access.

    Raise ImageLoadError saying what is wrong otherwise.
    """
    try:
        _split_url(url)
    except _URLProblem as exc:
        if str(exc).startswith("scheme"):
            message = f"image URL {exc} in {short_repr(url)}; use from_path() for local files"
        else:
            message = f"image URL {exc}: {short_repr(url)}"
        raise ImageLoadError(message, source=url) from exc
    return url


def download(
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    allow_private_network: bool,
    deadline: float | None = None,
    cancellation: Cancellation | None = None,
) -> bytes:
    """The body of ``url``, following at most five redirects, each one checked.

    ``timeout`` is in seconds, for connecting and for each read; the whole
    download, name resolution included, must finish within three times that,
    and by ``deadline`` (a :func:`time.monotonic` value) when one is given.
    Addresses that are not public internet addresses are refused unless
    ``allow_private_network``. ``cancellation`` stops the download from
    another thread.
    """
    own = time.monotonic() + timeout * _TOTAL_TIMEOUT_FACTOR
    by_caller = deadline is not None and deadline < own
    job = _Download(url, timeout, max_bytes, allow_private_network, by_caller, cancellation)
    return job.run(min(own, deadline) if deadline is not None else own)


@dataclass(frozen=True, slots=True)
class _Download:
    """One download of ``url`` under its limits; every error names ``url`` as its source."""

    url: str
    timeout: float
    max_bytes: int
    allow_private_network: bool
    caller_deadline: bool
    """True when the caller's deadline, not ``3 x timeout``, ends the download."""
    cancellation: Cancellation | None

    def run(self, deadline: float) -> bytes:
        """The body of the URL, following at most five redirects, each one checked."""
        url = self.url
        try:
            target = _split_url(url)
        except _URLProblem as exc:  # check_url passed it; only a hand-built part gets here
            raise ImageLoadError(f"image URL {exc}: {short_repr(url)}", source=url) from exc
        for redirects in range(_MAX_REDIRECTS + 1):
            outcome = self._fetch(target, deadline)
            if isinstance(outcome, bytes):
                return outcome
            if redirects == _MAX_REDIRECTS:
                raise ImageLoadError(
                    f"image URL {url} redirected more than {_MAX_REDIRECTS} times (the last "
                    f"redirect pointed to {short_repr(outcome.location)}); check the URL",
                    source=url,
                )
            target = self._redirect_target(target, outcome.location)
        raise AssertionError("unreachable")  # pragma: no cover

    def _where(self, target: _Target) -> str:
        if target.url == self.url:
            return _short(target.url)
        return f"{_short(target.url)} (redirected from {_short(self.url)})"

    def _redirect_target(self, current: _Target, location: str) -> _Target:
        """The checked target of a redirect (its addresses are checked when fetched)."""
        new_url = location
        try:
            new_url = urllib.parse.urljoin(current.url, location)
            return _split_url(new_url)
        except (_URLProblem, ValueError) as exc:
            raise ImageLoadError(
                f"redirect to {short_repr(new_url)} refused: the URL {exc} (redirected from "
                f"{current.url}); only {' and '.join(_URL_SCHEMES)} URLs with a host are followed",
                source=self.url,
            ) from exc

    def _checked_addresses(self, target: _Target, deadline: float) -> list[str]:
        """The addresses of the target's host, refused unless the policy allows all of them."""
        try:
            addresses = _resolve_by(target.host, target.port, deadline, self.cancellation)
        except _Cancelled:
            raise self._cancelled_error(target) from None
        except TimeoutError as exc:
            raise self._network_error(exc, target, fired=True) from exc
        except (OSError, UnicodeError) as exc:
            raise ImageLoadError(
                f"could not resolve the host {target.host!r} of image URL {self._where(target)} "
                f"({exc}); check the URL and network",
                source=self.url,
            ) from exc
        if not addresses:
            raise ImageLoadError(
                f"the host {target.host!r} of image URL {self._where(target)} resolves to no "
                "address; check the URL",
                source=self.url,
            )
        for address in [] if self.allow_private_network else addresses:
            problem = _address_problem(address)
            if problem is not None:
                # The address stays in the log: for an internal host name it is an
                # internal address, which the client must not learn.
                logger.debug(
                    "refused %s: %s resolves to %s (%s)", target.url, target.host, address, problem
                )
                raise ImageLoadError(
                    f"refusing to fetch {self._where(target)}: its host {target.host!r} "
                    f"resolves to a private/loopback address ({problem}); by default only "
                    "public internet addresses are fetched, so that a URL from a user cannot "
                    "reach internal services; pass allow_private_network=True for trusted setups",
                    source=self.url,
                )
        return addresses

    def _fetch(self, target: _Target, deadline: float) -> bytes | _Redirect:
        """One request: the body, or where a redirect points."""
        addresses = self._checked_addresses(target, deadline)
        connection = _connection(target, addresses, self.timeout, deadline)
        try:
            with _Watchdog(connection, deadline, self.cancellation) as watchdog:
                try:
                    outcome = self._exchange(connection, target)
                except (ImageLoadError, OSError, http.client.HTTPException, ValueError) as exc:
                    # Once the deadline has cut the connection, any error is the timeout.
                    if isinstance(exc, ImageLoadError) and not watchdog.fired:
                        raise
                    if watchdog.cancelled:
                        raise self._cancelled_error(target) from exc
                    raise self._network_error(exc, target, watchdog.fired) from exc
                if watchdog.cancelled:
                    raise self._cancelled_error(target)
                if watchdog.fired:
                    raise self._network_error(TimeoutError(), target, fired=True)
        finally:
            connection.close()
        if isinstance(outcome, bytes) and not outcome:
            raise ImageLoadError(
                f"downloaded 0 bytes from {self._where(target)}; the URL does not serve an image",
                source=self.url,
            )
        return outcome

    def _exchange(self, connection: _Pinned, target: _Target) -> bytes | _Redirect:
        connection.request("GET", target.path, headers=_REQUEST_HEADERS)
        with connection.getresponse() as response:
            return self._handle_response(response, target)

    def _handle_response(
        self, response: http.client.HTTPResponse, target: _Target
    ) -> bytes | _Redirect:
        status = f"HTTP {response.status} {response.reason}"
        if response.status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location or not location.strip():
                raise ImageLoadError(
                    f"{self._where(target)} answered {status} without a Location header; "
                    "check the URL",
                    source=self.url,
                )
            return _Redirect(location.strip())
        if not 200 <= response.status < 300:
            raise ImageLoadError(
                f"HTTP error {response.status} {response.reason} downloading image "
                f"{self._where(target)}; check the URL",
                source=self.url,
            )
        content_type = response.getheader("Content-Type")
        mime = _content_type_problem(content_type)
        if mime is not None:
            raise ImageLoadError(
                f"{self._where(target)} has Content-Type {mime!r}, not an image; the server "
                "must send image/* or application/octet-stream (is this the URL of a web page "
                "rather than of the image itself?)",
                source=self.url,
            )
        return self._read_body(response, target)

    def _read_body(self, response: http.client.HTTPResponse, target: _Target) -> bytes:
        too_big = (
            f"download of {self._where(target)} is over the limit of max_bytes="
            f"{self.max_bytes} bytes; pass a larger max_bytes= to allow it"
        )
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageLoadError(
                f"{too_big} (the server announced {declared} bytes)", source=self.url
            )
        chunks: list[bytes] = []
        received = 0
        # read1 returns what one socket read gave, so an oversized body is
        # abandoned as soon as the limit is passed, not once complete.
        while chunk := response.read1(_DOWNLOAD_CHUNK):
            received += len(chunk)
            if received > self.max_bytes:
                raise ImageLoadError(
                    f"{too_big} (stopped after receiving {received} bytes)",
                    source=self.url,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _cancelled_error(self, target: _Target) -> ImageLoadError:
        return ImageLoadError(
            f"the download of image {self._where(target)} was cancelled", source=self.url
        )

    def _network_error(self, exc: BaseException, target: _Target, fired: bool) -> ImageLoadError:
        where = self._where(target)
        if fired and self.caller_deadline:
            message = (
                f"timed out: downloading image {where} did not finish within the time its "
                "request allows for loading images"
            )
        elif fired:
            total = self.timeout * _TOTAL_TIMEOUT_FACTOR
            message = (
                f"timed out: downloading image {where} took longer than {total:g} s "
                f"({_TOTAL_TIMEOUT_FACTOR} x timeout={self.timeout:g} s) in all; check the "
                "server or pass a larger timeout="
            )
        elif isinstance(exc, TimeoutError):
            message = (
                f"timed out after {self.timeout:g} s downloading image {where}; check the "
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
        return ImageLoadError(message, source=self.url)
