"""ImagePart.from_url against hostile servers and addresses.

Every server here listens on 127.0.0.1 in a thread of the test process, and
every handler stops by itself within a few seconds. No test sends anything
anywhere else: the addresses the default policy refuses are refused before
any connection is attempted (``_open_socket`` is replaced to prove it), and
"public" hosts are fakes that resolve to documentation addresses while the
socket actually goes to the local server.
"""

from __future__ import annotations

import http.server
import io
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from idefics_kit import _fetch
from idefics_kit.errors import ImageLoadError
from idefics_kit.images import ImagePart


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
HANDLER_LIMIT_S = 5.0
"""No handler runs longer than this, whatever the client does."""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        """(path, Host header) of every request received."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up early is the point of several tests

    def seen(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.requests]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.path, self.headers.get("Host", "")))
        route = self.path.split("?")[0]
        if route.startswith("/chain/"):
            left = int(route.rsplit("/", 1)[1])
            self._redirect(f"/chain/{left - 1}" if left else "/ok.png")
            return
        ROUTES.get(route, _Handler._not_found)(self)

    def _send(self, status: int, body: bytes, content_type: str | None = "image/png") -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def _streaming_headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _not_found(self) -> None:
        self._send(404, b"not here", "text/plain")

    def _drip(self) -> None:
        # A byte every 0.1 s: each read is quick, the whole body never ends.
        self._streaming_headers()
        deadline = time.monotonic() + HANDLER_LIMIT_S
        while time.monotonic() < deadline and not self.server.release.is_set():
            self.wfile.write(b"\x00")
            self.wfile.flush()
            time.sleep(0.1)

    def _endless(self) -> None:
        self._streaming_headers()
        deadline = time.monotonic() + HANDLER_LIMIT_S
        block = b"\x00" * 65536
        while time.monotonic() < deadline and not self.server.release.is_set():
            self.wfile.write(block)  # raises once the client hangs up

    def _silent(self) -> None:
        self.server.release.wait(HANDLER_LIMIT_S)


def _sender(status: int, body: bytes, content_type: str | None = "image/png") -> Any:
    return lambda handler: handler._send(status, body, content_type)


def _redirector(location: str, status: int = 302) -> Any:
    return lambda handler: handler._redirect(location, status)


ROUTES: dict[str, Callable[[_Handler], None]] = {
    "/ok.png": _sender(200, PNG),
    "/octet": _sender(200, PNG, "application/octet-stream"),
    "/no-type": _sender(200, PNG, None),
    "/upper-type": _sender(200, PNG, "IMAGE/PNG; charset=binary"),
    "/html": _sender(200, b"<html><body>a gallery</body></html>", "text/html; charset=utf-8"),
    "/json": _sender(200, b'{"url": "x.png"}', "application/json"),
    "/svg": _sender(200, b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
    "/500": _sender(500, b"boom", "text/plain"),
    "/loop": _redirector("/loop"),
    "/relative": _redirector("ok.png", 301),
    "/to-ftp": _redirector("ftp://127.0.0.1/a.png"),
    "/to-file": _redirector("file:///etc/passwd", 307),
    "/no-location": lambda handler: handler._send(302, b"", None),
    "/to-private": _redirector("http://10.0.0.1/x.png"),
    "/to-metadata": _redirector("http://169.254.169.254/latest/meta-data/"),
    "/drip": _Handler._drip,
    "/endless": _Handler._endless,
    "/silent": _Handler._silent,
}


def _serve(server: _Server) -> Iterator[_Server]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(HANDLER_LIMIT_S)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    yield from _serve(_Server())


@pytest.fixture(autouse=True)
def _fresh_log(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        local: _Server = request.getfixturevalue("server")
        with local.lock:
            local.requests.clear()


def base(server: _Server, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.server_address[1]}"


def trusted(url: str, **options: Any) -> ImagePart:
    return ImagePart.from_url(url, allow_private_network=True, **options)


# -- servers that misbehave (a trusted setup: allow_private_network=True) -----------------------


@pytest.mark.parametrize("path", ["/ok.png", "/octet", "/no-type", "/upper-type", "/relative"])
def test_image_served(server: _Server, path: str) -> None:
    image = trusted(base(server) + path).load()
    assert image.size == (6, 4)
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_slow_drip_hits_the_overall_deadline(server: _Server) -> None:
    url = base(server) + "/drip"
    start = time.monotonic()
    with pytest.raises(
        ImageLoadError,
        match=r"timed out: downloading image .*/drip took longer than 0\.9 s \(3 x timeout=0\.3 s\)",
    ) as info:
        trusted(url, timeout=0.3).load()
    assert 0.8 < time.monotonic() - start < 2.5
    assert info.value.source == url


def test_slow_dns_is_inside_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Name resolution was outside the download's deadline: a resolver that hangs held the
    # thread for as long as it liked.
    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["192.0.2.1"]

    monkeypatch.setattr(_fetch, "_resolve", hanging)
    start = time.monotonic()
    try:
        with pytest.raises(ImageLoadError, match=r"took longer than 0\.6 s \(3 x timeout"):
            ImagePart.from_url("http://slow-dns.example/a.png", timeout=0.2).load()
        assert time.monotonic() - start < 1.5
        # A caller's deadline (a server's per-request time) ends it sooner still.
        start = time.monotonic()
        with pytest.raises(ImageLoadError, match="did not finish within the time its request"):
            ImagePart.from_url("http://slow-dns.example/a.png").load(
                deadline=time.monotonic() + 0.3
            )
        assert time.monotonic() - start < 1.0
    finally:
        release.set()


def test_cancellation_stops_a_download_at_once(server: _Server) -> None:
    cancellation = _fetch.Cancellation()
    timer = threading.Timer(0.3, cancellation.cancel)
    timer.start()
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"the download of image .*/drip was cancelled"):
        trusted(base(server) + "/drip", timeout=5).load(cancellation=cancellation)
    assert time.monotonic() - start < 1.0
    # Cancelled before it starts: no connection at all.
    seen = len(server.seen())
    with pytest.raises(ImageLoadError, match="was cancelled"):
        trusted(base(server) + "/ok.png").load(cancellation=cancellation)
    assert len(server.seen()) == seen


def test_cancellation_while_connecting_is_not_missed(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    cancellation = _fetch.Cancellation()
    real_open = _fetch._open_socket

    def open_then_cancel(address: str, port: int, timeout: float) -> socket.socket:
        cancellation.cancel()  # lands after the watchdog started, before the socket is known
        return real_open(address, port, timeout)

    monkeypatch.setattr(_fetch, "_open_socket", open_then_cancel)
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="was cancelled"):
        trusted(base(server) + "/drip", timeout=5).load(cancellation=cancellation)
    assert time.monotonic() - start < 1.0


def test_refusal_of_an_internal_name_does_not_tell_its_address(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_fetch, "_resolve", lambda host, port: ["10.20.30.40"])
    with (
        caplog.at_level("DEBUG", logger="idefics_kit.fetch"),
        pytest.raises(ImageLoadError) as info,
    ):
        ImagePart.from_url("http://db.internal/a.png").load()
    message = str(info.value)
    assert message.startswith(
        "refusing to fetch http://db.internal/a.png: its host 'db.internal' resolves to a "
        "private/loopback address (private);"
    ), message
    assert "10.20.30.40" not in message
    assert "db.internal resolves to 10.20.30.40 (private)" in caplog.text  # the log has it


def test_silent_server_hits_the_read_timeout(server: _Server) -> None:
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 0\.3 s downloading image"):
        trusted(base(server) + "/silent", timeout=0.3).load()
    assert time.monotonic() - start < 1.5


def test_endless_body_stops_at_max_bytes_while_streaming(server: _Server) -> None:
    start = time.monotonic()
    with pytest.raises(
        ImageLoadError,
        match=r"over the limit of max_bytes=200000 bytes.*stopped after receiving \d+ bytes",
    ):
        trusted(base(server) + "/endless", max_bytes=200_000, timeout=5).load()
    assert time.monotonic() - start < 2.0


def test_redirect_loop_stops_after_five(server: _Server) -> None:
    url = base(server) + "/loop"
    with pytest.raises(
        ImageLoadError,
        match=r"redirected more than 5 times \(the last redirect pointed to '/loop'\)",
    ) as info:
        trusted(url).load()
    assert info.value.source == url
    assert server.seen() == ["/loop"] * 6  # the first request and five redirects


def test_five_redirects_are_followed_six_are_not(server: _Server) -> None:
    assert trusted(base(server) + "/chain/4").load().size == (6, 4)  # 5 redirects
    with pytest.raises(ImageLoadError, match="redirected more than 5 times"):
        trusted(base(server) + "/chain/5").load()


BAD_RESPONSES: dict[str, tuple[str, str]] = {
    "redirect_to_ftp": (
        "/to-ftp",
        r"redirect to 'ftp://127\.0\.0\.1/a\.png' refused: the URL scheme must be",
    ),
    "redirect_to_file": (
        "/to-file",
        r"redirect to 'file:///etc/passwd' refused: the URL scheme must be",
    ),
    "redirect_without_location": (
        "/no-location",
        r"/no-location answered HTTP 302 Found without a Location header",
    ),
    "content_type_html": (
        "/html",
        r"has Content-Type 'text/html', not an image; the server must send image/\*",
    ),
    "content_type_json": ("/json", r"has Content-Type 'application/json', not an image"),
    "http_404": (
        "/missing.png",
        r"HTTP error 404 Not Found downloading image http://.*/missing\.png; check the URL",
    ),
    "http_500": ("/500", r"HTTP error 500 Internal Server Error downloading image"),
    "svg_served": ("/svg", r"is not an image Pillow can read here: it is an SVG \(vector\) image"),
}


@pytest.mark.parametrize("name", BAD_RESPONSES)
def test_bad_responses(server: _Server, name: str) -> None:
    path, message = BAD_RESPONSES[name]
    url = base(server) + path
    with pytest.raises(ImageLoadError, match=message) as info:
        trusted(url).load()
    assert info.value.source == url


def test_private_redirect_allowed_when_trusted(server: _Server) -> None:
    # With allow_private_network=True every hop may go anywhere, 10.0.0.1
    # included: the connection to it is what fails (refused fast by the fake).
    url = base(server) + "/to-private"
    attempts: list[str] = []

    def only_loopback(address: str, port: int, timeout: float) -> socket.socket:
        attempts.append(address)
        if address != "127.0.0.1":
            raise ConnectionRefusedError(111, f"fake network: {address}:{port} refused")
        return socket.create_connection((address, port), timeout=timeout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fetch, "_open_socket", only_loopback)
        with pytest.raises(
            ImageLoadError,
            match=r"could not download image http://10\.0\.0\.1/x\.png \(redirected from .*"
            r"fake network: 10\.0\.0\.1:80 refused",
        ):
            trusted(url).load()
    assert attempts == ["127.0.0.1", "10.0.0.1"]


# -- the default policy: refuse before connecting ---------------------------------------------


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (and refuse) every connection attempt."""
    attempts: list[tuple[str, int]] = []

    def record(address: str, port: int, timeout: float) -> socket.socket:
        attempts.append((address, port))
        raise AssertionError(f"a connection to {address}:{port} was attempted")

    monkeypatch.setattr(_fetch, "_open_socket", record)
    return attempts


REFUSED: dict[str, tuple[str, str, str]] = {
    "loopback_ip": ("http://127.0.0.1:{port}/x.png", "127.0.0.1", "loopback"),
    "localhost": ("http://localhost:{port}/x.png", r"(127\.0\.0\.1|::1)", "loopback"),
    "loopback_ipv6": ("http://[::1]:{port}/x.png", "::1", "loopback"),
    "private_10": ("http://10.0.0.1/x.png", r"10\.0\.0\.1", "private"),
    "private_192_168": ("http://192.168.1.20/cam.jpg", r"192\.168\.1\.20", "private"),
    "metadata_aws": (
        "http://169.254.169.254/latest/meta-data",
        r"169\.254\.169\.254",
        "a cloud metadata",
    ),
    "metadata_aws_ipv6": (
        "http://[fd00:ec2::254]/latest/meta-data",
        "fd00:ec2::254",
        "a cloud metadata",
    ),
    "metadata_alibaba": (
        "http://100.100.100.200/latest/meta-data",
        r"100\.100\.100\.200",
        "a cloud metadata",
    ),
    "unspecified": ("http://0.0.0.0:{port}/x.png", r"0\.0\.0\.0", "unspecified"),
    "ipv4_mapped_loopback": (
        "http://[::ffff:127.0.0.1]:{port}/x.png",
        r"::ffff:127\.0\.0\.1",
        "loopback, embedded",
    ),
    "decimal_loopback": ("http://2130706433:{port}/x.png", r"127\.0\.0\.1", "loopback"),
    "multicast": ("http://224.0.0.1/x.png", r"224\.0\.0\.1", "multicast"),
    "link_local_ipv6": ("https://[fe80::1]/x.png", "fe80::1", "link-local"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_default_policy_refuses_without_connecting(
    server: _Server, no_connections: list[tuple[str, int]], name: str
) -> None:
    template, address, kind = REFUSED[name]
    url = template.format(port=server.server_address[1])
    start = time.monotonic()
    with pytest.raises(ImageLoadError) as info:
        ImagePart.from_url(url).load()
    assert time.monotonic() - start < 0.5
    message = str(info.value)
    host = urllib.parse.urlsplit(url).hostname
    assert message.startswith(
        f"refusing to fetch {url}: its host {host!r} resolves to a private/loopback address ({kind}"
    ), message
    assert message.endswith("; pass allow_private_network=True for trusted setups")
    # What the host resolved to is not told (for an internal name, an internal address)...
    if not re.fullmatch(address, host):
        assert not re.search(address, message), message
    assert info.value.source == url
    assert no_connections == []
    assert server.seen() == []


def test_trusted_setup_fetches_from_loopback(server: _Server) -> None:
    url = base(server, "localhost") + "/ok.png"
    with pytest.raises(ImageLoadError, match="refusing to fetch"):
        ImagePart.from_url(url).load()
    assert ImagePart.from_url(url, allow_private_network=True).load().size == (6, 4)
    assert server.seen() == ["/ok.png"]


def test_allow_private_network_is_a_frozen_keyword() -> None:
    part = ImagePart.from_url("http://x.test/a.png", allow_private_network=True)
    assert part.allow_private_network is True
    assert ImagePart.from_url("http://x.test/a.png").allow_private_network is False
    assert part != ImagePart.from_url("http://x.test/a.png")
    with pytest.raises(AttributeError):
        part.allow_private_network = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        ImagePart.from_url("http://x.test/a.png", True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="allow_private_network must be True or False, got 1"):
        ImagePart.from_url("http://x.test/a.png", allow_private_network=1)  # type: ignore[arg-type]


# -- redirects re-checked, with a fake "public" network ----------------------------------------

PUBLIC_ADDRESS = "192.0.2.10"  # TEST-NET-1, never routed; the socket goes to 127.0.0.1 instead


@pytest.fixture
def fake_public_dns(server: _Server, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Names ending in .example resolve to a public-looking address; sockets reach the test server.

    Returns the (address, port) pairs connected to.
    """
    real_getaddrinfo = socket.getaddrinfo
    connects: list[tuple[str, int]] = []

    def fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".example"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_ADDRESS, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def fake_open(address: str, port: int, timeout: float) -> socket.socket:
        connects.append((address, port))
        return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(_fetch, "_open_socket", fake_open)
    monkeypatch.setattr(_fetch, "_address_problem", _treat_test_net_as_public)
    return connects


_real_address_problem = _fetch._address_problem


def _treat_test_net_as_public(address: str) -> str | None:
    return None if address == PUBLIC_ADDRESS else _real_address_problem(address)


def test_fake_public_host_is_fetched(
    server: _Server, fake_public_dns: list[tuple[str, int]]
) -> None:
    port = server.server_address[1]
    assert ImagePart.from_url(f"http://images.example:{port}/ok.png").load().size == (6, 4)
    assert fake_public_dns == [(PUBLIC_ADDRESS, port)]
    assert server.requests == [("/ok.png", f"images.example:{port}")]  # Host: the URL's name


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/to-private", r"http://10\.0\.0\.1/x\.png"),
        ("/to-metadata", r"http://169\.254\.169\.254/latest/meta-data/"),
    ],
)
def test_redirect_to_private_address_refused(
    server: _Server, fake_public_dns: list[tuple[str, int]], path: str, target: str
) -> None:
    port = server.server_address[1]
    url = f"http://images.example:{port}{path}"
    with pytest.raises(
        ImageLoadError,
        match=rf"refusing to fetch {target} \(redirected from http://images\.example:{port}"
        rf"{path}\): its host '[0-9.]+' resolves to a private/loopback address",
    ) as info:
        ImagePart.from_url(url).load()
    assert info.value.source == url
    assert fake_public_dns == [(PUBLIC_ADDRESS, port)]  # the redirect target was never connected


def test_redirect_to_loopback_name_refused(
    server: _Server, fake_public_dns: list[tuple[str, int]]
) -> None:
    port = server.server_address[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ROUTES, "/to-localhost", _redirector(f"http://localhost:{port}/ok.png"))
        with pytest.raises(ImageLoadError, match=r"refusing to fetch http://localhost:\d+/ok\.png"):
            ImagePart.from_url(f"http://images.example:{port}/to-localhost").load()
    assert server.seen() == ["/to-localhost"]


def test_each_hop_resolved_once_and_connected_by_address(
    server: _Server, fake_public_dns: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: a name that is public when checked and loopback a moment
    # later must be connected to at the checked address.
    answers = iter([PUBLIC_ADDRESS, "127.0.0.1"])
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.example":
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = server.server_address[1]
    assert ImagePart.from_url(f"http://rebind.example:{port}/ok.png").load().size == (6, 4)
    assert lookups == ["rebind.example"]
    assert fake_public_dns == [(PUBLIC_ADDRESS, port)]


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "a cloud metadata service"),
        ("169.254.170.2", "a cloud metadata service"),
        ("169.254.1.1", "link-local"),
        ("168.63.129.16", "a cloud metadata service"),
        ("192.0.0.192", "a cloud metadata service"),
        ("100.64.0.1", "not globally routable"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1%eth0", "link-local"),
        ("fd00:ec2::254", "a cloud metadata service"),
        ("fc00::5", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private, embedded in an IPv6 address"),
        ("64:ff9b::a9fe:a9fe", "a cloud metadata service, embedded in an IPv6 address"),
        ("2002:7f00:1::", "loopback, embedded in an IPv6 address"),
        ("2001:db8::1", "private"),
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_policy(address: str, problem: str | None) -> None:
    assert _fetch._address_problem(address) == problem


# -- URLs refused when built (no network at all) -----------------------------------------------


BUILT_REFUSED: dict[str, tuple[str, str]] = {
    "header_injection": (
        "http://a.test/x\r\nHost: evil",
        r"contains the control character U\+000D at index 15",
    ),
    "lone_surrogate": ("http://a.test/\ud800", r"contains the lone surrogate U\+D800 at index 14"),
    "port_0": ("http://a.test:0/x", "has port 0"),
    "port_too_big": ("http://a.test:99999/x", "is malformed"),
    "space_in_host": ("http://a b/x", "has an invalid host name 'a b'"),
    "gopher": ("gopher://a.test/", "scheme must be one of http, https, got 'gopher'"),
    "scheme_relative": ("//a.test/x.png", r"got '\(none\)'"),
}


@pytest.mark.parametrize("name", BUILT_REFUSED)
def test_url_refused_when_built(name: str) -> None:
    url, message = BUILT_REFUSED[name]
    with pytest.raises(ImageLoadError, match=message) as info:
        ImagePart.from_url(url)
    assert info.value.source == url


def test_international_host_name_accepted() -> None:
    part = ImagePart.from_url("https://bücher.example/bild.png?größe=1")
    assert part.describe() == "https://bücher.example/bild.png?größe=1"
    target = _fetch._split_url(part.describe())
    assert target.host == "xn--bcher-kva.example"
    assert target.path == "/bild.png?gr%C3%B6%C3%9Fe=1"
    assert target.port == 443


# -- TLS: the pinned connection still verifies the URL's host name ---------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Server, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    local = _Server()
    local.socket = context.wrap_socket(local.socket, server_side=True)
    yield from ((served, cert) for served in _serve(local))


def test_https_verifies_the_host_name_not_the_address(
    tls_server: tuple[_Server, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    local, cert = tls_server
    port = local.server_address[1]
    # Untrusted self-signed certificate: refused with the system CAs.
    with pytest.raises(ImageLoadError, match="TLS certificate verification failed"):
        trusted(f"https://localhost:{port}/ok.png").load()
    monkeypatch.setattr(_fetch, "_tls_context", lambda: ssl.create_default_context(cafile=cert))
    # Connected to the resolved 127.0.0.1, verified as "localhost": accepted.
    assert trusted(f"https://localhost:{port}/ok.png").load().size == (6, 4)
    # The certificate does not name 127.0.0.1.
    with pytest.raises(
        ImageLoadError, match=r"TLS certificate verification failed .*not valid for '127\.0\.0\.1'"
    ):
        trusted(f"https://127.0.0.1:{port}/ok.png").load()
