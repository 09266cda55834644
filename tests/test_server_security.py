"""Issue 20: the server tried as an attacker would, over loopback, with a scripted generator.

Each test is one attack that worked before the hardening (an API key that a
mount prefix bypassed, slow bodies and slow image URLs that starved other
clients, client-chosen metric labels, refusal texts naming internal
addresses, megabyte error bodies), bounded in count and time. The memory
attack, with the real toy model, is in test_server_memory.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount

from idefics_kit import Generator
from idefics_kit.server import create_app
from idefics_kit.server.chat import ChatHandler, PixelBudget
from tests.test_server import (
    MODEL,
    RED,
    FakeGenerator,
    assert_openai_error,
    chat,
    image_message,
    samples,
    serving,
)

KEY = {"Authorization": "Bearer s3cret"}
HI = {"messages": [{"role": "user", "content": "x"}]}


# -- 1. the key holds wherever the app is mounted ---------------------------------------------


def assert_guarded(base: str) -> None:
    """Every route but /health needs the key at ``base``; with it, each answers."""
    for method, path in (
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", f"/v1/models/{MODEL}"),
        ("GET", "/metrics"),
        ("GET", "/v1/unknown"),  # deny by default: no hint about which paths exist
        ("GET", "/anything"),
    ):
        response = httpx.request(method, base + path, json=HI if method == "POST" else None)
        assert_openai_error(response, 401, "invalid_api_key")
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert chat(base, HI, headers=KEY).status_code == 200
    assert httpx.get(f"{base}/v1/models", headers=KEY).json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{base}/metrics", headers=KEY).status_code == 200
    assert_openai_error(httpx.get(f"{base}/v1/unknown", headers=KEY), 404, "not_found")


def test_key_holds_direct_mounted_and_under_root_path() -> None:
    app = create_app(FakeGenerator(), served_model_name=MODEL, api_key="s3cret")  # type: ignore[arg-type]
    with serving(app) as url:
        assert_guarded(url)
    # Mounted under a prefix, as docs/server.md shows: the prefix was where the key got lost.
    outer = Starlette(routes=[Mount("/vlm", app=app)])
    with serving(outer) as url:
        assert_guarded(f"{url}/vlm")
    # Behind a proxy that strips /vlm: uvicorn puts the root_path back in front of the path.
    with serving(app, root_path="/vlm") as url:
        assert_guarded(url)


def test_a_route_added_later_needs_the_key() -> None:
    app = create_app(FakeGenerator(), served_model_name=MODEL, api_key="s3cret")  # type: ignore[arg-type]

    async def secret(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the crown jewels")

    async def ping(request: Request) -> PlainTextResponse:
        return PlainTextResponse("pong")

    app.add_route("/v1/secret", secret)
    app.add_route("/ping", ping, public=True)
    outer = Starlette(routes=[Mount("/vlm", app=app)])
    with serving(outer) as url:
        assert_openai_error(httpx.get(f"{url}/vlm/v1/secret"), 401, "invalid_api_key")
        assert httpx.get(f"{url}/vlm/v1/secret", headers=KEY).text == "the crown jewels"
        assert httpx.get(f"{url}/vlm/ping").text == "pong"


def test_metrics_without_key_opens_only_metrics() -> None:
    app = create_app(
        FakeGenerator(),  # type: ignore[arg-type]
        served_model_name=MODEL,
        api_key="s3cret",
        metrics_without_key=True,
    )
    with serving(app) as url:
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")


# -- 2. metrics: labels from a fixed set --------------------------------------------------------


def test_made_up_methods_and_paths_add_no_series() -> None:
    app = create_app(FakeGenerator(), served_model_name=MODEL, api_key="s3cret")  # type: ignore[arg-type]
    with serving(app) as url, httpx.Client() as client:

        def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
            text = client.get(f"{url}/metrics", headers=KEY).text
            return {key for key in samples(text) if key[0] == "idefics_kit_http_requests_total"}

        client.request("BREW", f"{url}/v1/models", headers=KEY)  # the "other" series exist now
        client.request("BREW", f"{url}/x", headers=KEY)
        client.request("BREW", f"{url}/x")
        before = series()
        for number in range(40):
            client.request(f"M{number}", f"{url}/v1/models", headers=KEY)  # 405
            client.request(f"M{number}", f"{url}/p{number}", headers=KEY)  # 404
            client.request(f"M{number}", f"{url}/q{number}")  # 401
        after = series()
    assert after - before <= {
        ("idefics_kit_http_requests_total", (("method", "GET"), ("route", "/metrics"), s))
        for s in (("status", "200"),)
    }
    labels = {dict(labels)["method"] for _, labels in after}
    assert labels <= {"GET", "POST", "other"}
    routes = {dict(labels)["route"] for _, labels in after}
    assert routes <= {"/v1/models", "/metrics", "other"}


# -- 3. slow bodies get 408, never other clients' 503 -------------------------------------------


def open_slow_body(url: str) -> socket.socket:
    """A chat request whose body never finishes: the head and one byte of 100."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    return sock


def read_status(sock: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    received = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in received:
            data = sock.recv(4096)
            if not data:
                break
            received += data
    return received.split(b"\r\n", 1)[0], time.monotonic() - started


def test_slow_bodies_get_408_and_never_starve_other_clients() -> None:
    app = create_app(
        FakeGenerator(),  # type: ignore[arg-type]
        served_model_name=MODEL,
        max_concurrent_requests=4,
        body_timeout=2.0,
    )
    with serving(app) as url:
        slow = [open_slow_body(url) for _ in range(12)]
        try:
            time.sleep(0.3)  # all twelve are being read now
            started = time.monotonic()
            assert chat(url, HI).status_code == 200
            assert time.monotonic() - started < 1.5
            statuses = [read_status(sock) for sock in slow]
        finally:
            for sock in slow:
                sock.close()
    for status, seconds in statuses:
        assert status == b"HTTP/1.1 408 Request Timeout", status
        assert seconds < 4


def test_receiving_requests_are_bounded_separately() -> None:
    app = create_app(
        FakeGenerator(),  # type: ignore[arg-type]
        served_model_name=MODEL,
        max_receiving_requests=2,
        body_timeout=3.0,
    )
    with serving(app) as url:
        slow = [open_slow_body(url) for _ in range(2)]
        try:
            time.sleep(0.3)
            response = chat(url, HI)
            error = assert_openai_error(response, 503, "overloaded")
            assert "2 requests are still sending their bodies" in error["message"]
            assert response.headers["retry-after"] == "1"
        finally:
            for sock in slow:
                sock.close()
        time.sleep(0.3)
        assert chat(url, HI).status_code == 200


# -- 4. slow image URLs: their own deadline and threads ----------------------------------------


class DripServer(http.server.ThreadingHTTPServer):
    """Image URLs that send a byte every 0.1 s and never end (until ``stop``)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _DripHandler)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.opened = 0
        self.hung_up = 0


class _DripHandler(http.server.BaseHTTPRequestHandler):
    server: DripServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.active += 1
            self.server.opened += 1
            self.server.most = max(self.server.most, self.server.active)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.close_connection = True
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not self.server.stop.is_set():
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            with self.server.lock:
                self.server.hung_up += 1
        finally:
            with self.server.lock:
                self.server.active -= 1


@contextlib.contextmanager
def drip_server() -> Iterator[DripServer]:
    server = DripServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def drip_request(server: DripServer, count: int) -> dict[str, Any]:
    port = server.server_address[1]
    parts = [
        {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/{n}.png"}}
        for n in range(count)
    ]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "x"}]}]}


def test_slow_image_urls_delay_no_data_image_and_end_by_the_request_deadline() -> None:
    fake = FakeGenerator()
    app = create_app(
        fake,  # type: ignore[arg-type]
        served_model_name=MODEL,
        allow_private_network=True,
        image_timeout=2.0,
        max_image_pixels=1000 * 1000,  # the fake has no processor: images reserve this much
    )
    with drip_server() as drips, serving(app) as url:
        answers: list[tuple[httpx.Response, float]] = []

        def attacker() -> None:
            started = time.monotonic()
            response = chat(url, drip_request(drips, 8))
            answers.append((response, time.monotonic() - started))

        threads = [threading.Thread(target=attacker) for _ in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while drips.active < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        assert chat(url, {"messages": image_message(RED, "Color?")}).status_code == 200
        assert time.monotonic() - started < 1.0
        for thread in threads:
            thread.join(15)
        # Four downloads at a time per request (the default), all ended by its deadline.
        assert drips.most <= 8 * 4
    assert len(answers) == 8
    for response, seconds in answers:
        error = assert_openai_error(response, 400)
        assert error["code"] == "image_timeout", error
        assert "took longer than 2 s" in error["message"], error
        assert seconds < 4.5


def test_downloads_per_request_are_bounded_and_a_client_that_leaves_cancels_them() -> None:
    app = create_app(
        FakeGenerator(),  # type: ignore[arg-type]
        served_model_name=MODEL,
        allow_private_network=True,
        max_downloads_per_request=2,
        image_timeout=20.0,
    )
    with drip_server() as drips, serving(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=drip_request(drips, 6), timeout=1.0)
        # The client left after 1 s: its two downloads stop at once, no others start.
        deadline = time.monotonic() + 3
        while (drips.active or app.in_flight) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert drips.active == 0
        assert app.in_flight == 0
        assert drips.most == 2
        assert drips.opened == 2


# -- 5. refusal texts and error texts -----------------------------------------------------------


def test_refusal_does_not_say_what_the_host_resolved_to() -> None:
    with serving(create_app(FakeGenerator(), served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        port = url.rsplit(":", 1)[1]
        response = chat(url, {"messages": image_message(f"http://localhost:{port}/a.png", "x")})
    error = assert_openai_error(response, 400, "invalid_image")
    assert "refusing to fetch http://localhost:" in error["message"]
    assert (
        "its host 'localhost' resolves to a private/loopback address (loopback)"
        in (error["message"])
    )
    assert "127.0.0.1" not in error["message"]
    assert "::1" not in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop", [f"stop-{n}" for n in range(10_000)]),
        ("logit_bias", {str(n): 1 for n in range(200_000)}),
        ("temperature", "9" * 100_000),
        ("messages", [{"role": "x" * 100_000, "content": "x"}]),
        ("model", "m" * 100_000),
    ],
)
def test_error_texts_quote_only_a_prefix(field: str, value: Any) -> None:
    with serving(create_app(FakeGenerator(), served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        response = chat(url, {**HI, field: value})
    assert response.status_code in (400, 404)
    assert len(response.content) < 1500, response.content[:300]
    assert "..." in response.json()["error"]["message"]


# -- 6. health, parsing off the loop, the pixel budget ------------------------------------------


def test_health_is_503_when_the_generator_cannot_serve() -> None:
    fake = FakeGenerator()
    with serving(create_app(fake, served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        assert httpx.get(f"{url}/health").status_code == 200
        fake.ready = False
        response = httpx.get(f"{url}/health")
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable"}
    gen = Generator.from_pretrained("toy", device="cpu")
    app = create_app(gen, served_model_name=MODEL)
    with serving(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        gen.close()
        assert httpx.get(f"{url}/health").status_code == 503


def test_large_bodies_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[tuple[int, bool]] = []
    original = ChatHandler.parse

    def parse(self: ChatHandler, body: bytes) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        threads.append((len(body), on_loop))
        return original(self, body)

    monkeypatch.setattr(ChatHandler, "parse", parse)
    with serving(create_app(FakeGenerator(), served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        assert chat(url, HI).status_code == 200
        big = {"messages": [{"role": "user", "content": "x" * 200_000}]}
        assert chat(url, big).status_code == 200
    assert [on_loop for _, on_loop in threads] == [True, False]
    assert threads[1][0] > 200_000


def test_pixel_budget_waits_in_order_then_refuses() -> None:
    async def main() -> list[str]:
        budget = PixelBudget(10)
        events: list[str] = []
        assert await budget.acquire(6, 1)

        async def waiter(name: str, pixels: int, timeout: float) -> None:
            granted = await budget.acquire(pixels, timeout)
            events.append(f"{name}:{granted}")

        first = asyncio.ensure_future(waiter("a", 8, 5))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(waiter("b", 1, 5))  # fits, but waits its turn
        third = asyncio.ensure_future(waiter("c", 5, 0.05))
        await asyncio.sleep(0.1)
        events.append("release")
        budget.release(6)
        await asyncio.gather(first, second, third)
        assert budget.held == 9
        assert not await budget.acquire(11, 1)  # more than the whole budget: never
        return events

    assert asyncio.run(main()) == ["c:False", "release", "a:True", "b:True"]


def test_a_request_waits_for_room_then_gets_503() -> None:
    slow = FakeGenerator(pieces=("a",) * 10, delay=0.2)
    app = create_app(
        slow,  # type: ignore[arg-type]
        served_model_name=MODEL,
        max_images_per_request=1,
        max_image_pixels=200 * 200,
        max_decoded_pixels=200 * 200,
        image_timeout=0.5,
    )
    body = {"messages": image_message(RED, "Color?")}
    with serving(app) as url:
        first = threading.Thread(target=chat, args=(url, body))
        first.start()
        deadline = time.monotonic() + 5
        while app.chat.images.budget.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        response = chat(url, body)
        waited = time.monotonic() - started
        error = assert_openai_error(response, 503, "overloaded")
        assert "budget of 40000 decoded pixels" in error["message"]
        assert response.headers["retry-after"] == "1"
        assert 0.4 < waited < 1.5
        assert chat(url, HI).status_code == 200  # no images: no wait
        first.join(10)
        assert app.chat.images.budget.held == 0
        assert chat(url, body).status_code == 200


def test_a_budget_too_small_for_one_request_is_refused_at_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from idefics_kit.cli import main

    # The toy keeps at most 96 x 96 pixels of an image: 8 images need 73,728.
    assert main(["serve", "--max-decoded-pixels", "73727", "--device", "cpu", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "max_decoded_pixels=73727 cannot hold one request's images" in error
    assert "8 images of up to 9216 pixels each once scaled down need 73728" in error
