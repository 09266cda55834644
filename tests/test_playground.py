"""Issue 23: the playground page of ``idefics-kit serve``, over HTTP and in a real browser.

The HTTP tests check the routes: the page's three files come from the package
data with their Content-Security-Policy, they are the only public routes
besides ``/health``, a fixed set (nothing to traverse), and ``--no-playground``
/ ``create_app(playground=False)`` leave them out.

The browser tests (marker ``browser``) drive the system chromium through
playwright against the real toy model served by uvicorn on 127.0.0.1: a
picture attached, a question asked, the right colour streamed into the page
with its stats line; several turns and "New chat"; HTML typed as a question
or streamed as an answer shown as text and never run; the API key path;
server errors shown in words with the page still working; and no request
leaving the server's origin. Without chromium or playwright they skip, unless
the ``CI`` environment variable is set: then they fail, so CI really runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from idefics_kit import Generator
from idefics_kit.server import create_app
from idefics_kit.server.playground import CONTENT_SECURITY_POLICY
from idefics_kit.toy import TOY_MODEL
from idefics_kit.toy.scenes import QUESTIONS, draw_scene
from tests.conftest import picture as noise
from tests.test_server import MODEL, FakeGenerator, assert_openai_error, serving

KEY = "s3cret-playground"
COLOR = QUESTIONS["color"]
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("style.css", "text/css; charset=utf-8"),
}


def packaged(name: str) -> bytes:
    return resources.files("idefics_kit.server").joinpath("static", name).read_bytes()


async def fetch_all(app: Any, requests: list[tuple[str, str]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.request(method, path) for method, path in requests]


def get(app: Any, *paths: str, method: str = "GET") -> list[httpx.Response]:
    return asyncio.run(fetch_all(app, [(method, path) for path in paths]))


# -- the routes, over HTTP -----------------------------------------------------------------


def test_page_files_come_from_the_package_with_the_security_headers() -> None:
    app = create_app(FakeGenerator(), served_model_name=MODEL, api_key=KEY)  # type: ignore[arg-type]
    responses = get(app, *PAGE_FILES)
    for (path, (name, media_type)), response in zip(PAGE_FILES.items(), responses, strict=True):
        assert response.status_code == 200, path
        assert response.content == packaged(name), path
        assert response.headers["content-type"] == media_type
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    # HEAD answers too (uvicorn drops the body).
    (head,) = get(app, "/", method="HEAD")
    assert head.status_code == 200
    assert head.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_only_the_page_and_health_are_open_and_nothing_else_is_served() -> None:
    app = create_app(FakeGenerator(), served_model_name=MODEL, api_key=KEY)  # type: ignore[arg-type]
    guarded = [
        "/v1/models",
        "/metrics",
        "/index.html",
        "/app.js",
        "/static/app.js",
        "/playground.js/../app.js",
        "/%2e%2e/pyproject.toml",
        "/..%2fpyproject.toml",
        "/playground.css%00.js",
    ]
    for path, response in zip(guarded, get(app, *guarded), strict=True):
        assert_openai_error(response, 401, "invalid_api_key")
        assert "content-security-policy" not in response.headers, path
    # Without a key the same paths are plain JSON 404s (not files, not the page).
    open_app = create_app(FakeGenerator(), served_model_name=MODEL)  # type: ignore[arg-type]
    for response in get(open_app, *guarded[2:]):
        assert_openai_error(response, 404, "not_found")
    # Only GET (and HEAD) on the page.
    (post,) = get(open_app, "/", method="POST")
    assert_openai_error(post, 405, "method_not_allowed")


def test_playground_false_leaves_the_page_out() -> None:
    app = create_app(FakeGenerator(), served_model_name=MODEL, playground=False)  # type: ignore[arg-type]
    for response in get(app, *PAGE_FILES):
        assert_openai_error(response, 404, "not_found")
        assert "content-security-policy" not in response.headers
    # With a key, deny by default holds for the page's paths too.
    keyed = create_app(FakeGenerator(), served_model_name=MODEL, api_key=KEY, playground=False)  # type: ignore[arg-type]
    for response in get(keyed, *PAGE_FILES):
        assert_openai_error(response, 401, "invalid_api_key")


def test_page_is_text_only_and_asks_only_its_own_origin() -> None:
    """The files keep the rules the CSP enforces, so a CSP bug would not go unnoticed."""
    html = packaged("index.html").decode()
    script = packaged("app.js").decode()
    css = packaged("style.css").decode()
    # No inline script, inline handler or inline style; every URL relative or data:.
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="./playground.js" defer>']
    assert not re.search(r"\son[a-z]+\s*=", html)
    assert not re.search(r"\sstyle\s*=", html)
    assert "<style" not in html
    urls = re.findall(r'\s(?:src|href|action)="([^"]*)"', html)
    assert urls == ["data:,", "./playground.css", "./playground.js"]
    # Text only: no HTML sink, no eval; and requests by relative URL to this origin.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    for text in (html, script, css):
        assert "http://" not in text
        assert "https://" not in text
        assert "//" + "cdn" not in text
    assert re.findall(r'fetch\("([^"]*)"', script) == ["v1/models", "v1/chat/completions"]


def test_no_playground_flag_reaches_create_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from idefics_kit import _cli_serve
    from idefics_kit.cli import build_parser

    served: list[Any] = []

    class NoServer:
        started = True

        def run(self) -> None:
            pass

    def fake_server(config: Any, app: Any, drain_seconds: float, page: str | None) -> NoServer:
        served.append((app, page))
        return NoServer()

    # No uvicorn.Config either: it would reconfigure this process's logging.
    monkeypatch.setattr(uvicorn, "Config", lambda app, **settings: None)
    monkeypatch.setattr(_cli_serve, "_draining_server", fake_server)
    for argv, status, page in (
        (["serve"], 200, "http://127.0.0.1:8000/"),  # logged once the server listens
        (["serve", "--host", "::1", "--port", "9"], 200, "http://[::1]:9/"),
        (["serve", "--no-playground"], 404, None),
    ):
        args = build_parser().parse_args(argv)
        assert isinstance(args, argparse.Namespace)
        assert _cli_serve.run_serve(args, FakeGenerator, MODEL, io.StringIO()) == 0  # type: ignore[arg-type]
        app, logged = served[-1]
        (response,) = get(app, "/")
        assert response.status_code == status, argv
        assert logged == page


def test_help_names_the_playground(capsys: pytest.CaptureFixture[str]) -> None:
    from idefics_kit.cli import main

    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-playground" in text
    assert "GET / is the playground" in text


# -- in a real browser ---------------------------------------------------------------------

CHROMIUM = os.environ.get("IDEFICS_KIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; it is in the dev extra)"
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing_browser()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The system chromium: playwright's own browser downloads are not available.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def toy() -> Generator:
    return Generator.from_pretrained(TOY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def toy_url(toy: Generator) -> Iterator[str]:
    with serving(create_app(toy, served_model_name="toy")) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(toy: Generator) -> Iterator[str]:
    """The toy model behind an API key, and taking one image per request."""
    app = create_app(toy, served_model_name="toy", api_key=KEY, max_images_per_request=1)
    with serving(app) as url:
        yield url


@dataclass
class Tab:
    """A page and everything it did: requests, script errors, CSP violations."""

    page: Any
    origin: str
    requests: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def chats(self) -> list[dict[str, Any]]:
        """The bodies of the chat completions the page sent, in order."""
        return [
            json.loads(r.post_data)
            for r in self.requests
            if r.method == "POST" and r.url.endswith("/v1/chat/completions")
        ]

    def assert_clean(self) -> None:
        """No script error, no CSP violation, no request to another origin."""
        assert self.errors == []
        assert [line for line in self.console if "Content Security Policy" in line] == []
        for request in self.requests:
            parts = urlsplit(request.url)
            if parts.scheme in ("data", "blob"):
                continue
            assert f"{parts.scheme}://{parts.netloc}" == self.origin, request.url


@pytest.fixture
def tab(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    made = Tab(page=page, origin="")
    page.on("request", lambda request: made.requests.append(request))
    page.on("pageerror", lambda error: made.errors.append(str(error)))
    page.on("console", lambda message: made.console.append(message.text))
    try:
        yield made
    finally:
        context.close()


def open_page(tab: Tab, url: str) -> Any:
    parts = urlsplit(url)
    tab.origin = f"{parts.scheme}://{parts.netloc}"
    tab.requests.clear()
    response = tab.page.goto(url)
    assert response is not None
    assert response.status == 200
    return tab.page


def scene_png(tmp_path: Path, color: str, seed: int) -> tuple[Path, str]:
    scene = draw_scene(random.Random(seed), color=color)  # type: ignore[arg-type]
    path = tmp_path / f"{color}-{seed}.png"
    scene.image.save(path)
    return path, scene.answer("color")


def ask(page: Any, question: str, *images: Path) -> None:
    if images:
        page.set_input_files("#images", [str(path) for path in images])
        page.locator("#attachments img").nth(len(images) - 1).wait_for()
    page.fill("#question", question)
    page.press("#question", "Enter")


def drop(page: Any, path: Path) -> None:
    """Drag ``path`` from outside the browser and drop it on the conversation."""
    transfer = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event("#conversation", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#conversation", "drop", {"dataTransfer": transfer})


def answered(page: Any, nth: int) -> tuple[str, str]:
    """Wait for answer ``nth`` (0-based) to finish; its text and stats line."""
    from playwright.sync_api import expect

    turn = page.locator(".turn.assistant:not(.error)").nth(nth)
    expect(turn.locator(".stats")).to_be_visible(timeout=30_000)
    return turn.locator(".text").inner_text(), turn.locator(".stats").inner_text()


def error_shown(page: Any, nth: int) -> str:
    """Wait for error ``nth`` (0-based) in the conversation; its text."""
    turn = page.locator(".turn.error").nth(nth)
    turn.locator(".error-text").wait_for()
    return str(turn.locator(".error-text").inner_text())


STATS = re.compile(
    r"^stop · \d+ prompt \+ (\d+) completion tokens · \d+\.\d\d s · first token \d+\.\d\d s"
    r" · \d+\.\d tokens/s$"
)


@pytest.mark.browser
@pytest.mark.slow
def test_the_toy_model_answers_a_picture_in_the_page(
    tab: Tab, toy_url: str, tmp_path: Path
) -> None:
    page = open_page(tab, toy_url + "/")
    from playwright.sync_api import expect

    expect(page.locator("#model option")).to_have_text(["toy"])
    picture, color = scene_png(tmp_path, "green", seed=3)
    ask(page, COLOR, picture)
    text, stats = answered(page, 0)
    assert text == color
    match = STATS.match(stats)
    assert match is not None, stats
    assert int(match.group(1)) >= 1
    # The question and its thumbnail are in the conversation; the composer is empty again.
    user = page.locator(".turn.user")
    assert user.locator(".text").inner_text() == COLOR
    assert user.locator("img.thumb").get_attribute("src").startswith("data:image/png;base64,")
    assert page.input_value("#question") == ""
    assert page.locator("#attachments img").count() == 0
    # What went over the wire: a streamed chat completion asking for usage, the picture inline.
    (body,) = tab.chats()
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "toy"
    assert body["max_tokens"] == 256
    assert body["temperature"] == 0
    (message,) = body["messages"]
    assert message["role"] == "user"
    image, question = message["content"]
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == picture.read_bytes()
    assert question == {"type": "text", "text": COLOR}
    paths = sorted({urlsplit(r.url).path for r in tab.requests if r.url.startswith("http")})
    assert paths == ["/", "/playground.css", "/playground.js", "/v1/chat/completions", "/v1/models"]
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_several_turns_then_new_chat(tab: Tab, toy_url: str, tmp_path: Path) -> None:
    page = open_page(tab, toy_url + "/")
    first, first_color = scene_png(tmp_path, "blue", seed=11)
    second, second_color = scene_png(tmp_path, "yellow", seed=12)
    ask(page, COLOR, first)
    assert answered(page, 0)[0] == first_color
    # Shift+Enter adds a line and sends nothing; the settings travel with the next question.
    page.fill("#question", "one")
    page.press("#question", "Shift+Enter")
    assert page.input_value("#question") == "one\n"
    assert len(tab.chats()) == 1
    page.fill("#max-tokens", "5")
    page.fill("#temperature", "0.5")
    drop(page, second)  # the second picture comes by drag-and-drop
    page.locator("#attachments img").wait_for()
    ask(page, COLOR)
    assert answered(page, 1)[0] == second_color
    # The second request carried the whole conversation, each turn with its picture.
    history = tab.chats()[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == first_color
    assert history[0]["content"][0]["type"] == history[2]["content"][0]["type"] == "image_url"
    assert history[0]["content"][0] != history[2]["content"][0]
    assert tab.chats()[1]["max_tokens"] == 5
    assert tab.chats()[1]["temperature"] == 0.5
    assert page.locator(".turn.user img.thumb").count() == 2
    # New chat: an empty page, and the next question goes alone.
    page.click("#new-chat")
    assert page.locator(".turn").count() == 0
    page.fill("#temperature", "0")
    third, third_color = scene_png(tmp_path, "red", seed=13)
    ask(page, COLOR, third)
    assert answered(page, 0)[0] == third_color
    assert len(tab.chats()[2]["messages"]) == 1
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_html_in_a_question_is_shown_as_text_and_never_runs(
    tab: Tab, toy_url: str, tmp_path: Path
) -> None:
    page = open_page(tab, toy_url + "/")
    payload = (
        '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
        "<b>bold</b> &amp;"
    )
    ask(page, payload)
    answered(page, 0)
    user = page.locator(".turn.user")
    assert user.locator(".text").inner_text() == payload
    assert user.locator("img, script, b").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert not [r.url for r in tab.requests if urlsplit(r.url).path.endswith("/x")]
    assert tab.chats()[0]["messages"][0]["content"] == [{"type": "text", "text": payload}]
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_html_in_an_answer_is_shown_as_text_under_a_mount_prefix(tab: Tab) -> None:
    """A model's output is untrusted too; and the page works mounted under /vlm."""
    pieces = ('<img src=x onerror="window.__pwned = 1">', "<script>window.__pwned = 2</script>")
    app = create_app(FakeGenerator(pieces=pieces), served_model_name=MODEL)  # type: ignore[arg-type]
    with serving(Starlette(routes=[Mount("/vlm", app=app)])) as url:
        page = open_page(tab, url + "/vlm")
        assert page.url == url + "/vlm/"  # the mount's redirect: relative URLs need the slash
        ask(page, "Say something nasty.")
        text, stats = answered(page, 0)
        assert text == "".join(pieces)
        assert stats.startswith(f"stop · 7 prompt + {len(pieces)} completion tokens · ")
        assert page.locator(".turn.assistant").locator("img, script").count() == 0
        assert page.evaluate("typeof window.__pwned") == "undefined"
    paths = {urlsplit(r.url).path for r in tab.requests}
    assert paths == {
        "/vlm",
        "/vlm/",
        "/vlm/playground.css",
        "/vlm/playground.js",
        "/vlm/v1/models",
        "/vlm/v1/chat/completions",
    }
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_the_api_key_path(tab: Tab, keyed_url: str, tmp_path: Path) -> None:
    page = open_page(tab, keyed_url + "/")
    from playwright.sync_api import expect

    # The page loads without the key and says what it needs.
    expect(page.locator("#notice")).to_contain_text("needs a valid API key (401)")
    picture, color = scene_png(tmp_path, "red", seed=21)
    ask(page, COLOR, picture)
    shown = error_shown(page, 0)
    assert shown.startswith("The server needs a valid API key (401): Missing API key")
    assert "Enter the key in the API key field" in shown
    # The question and its picture are back in the composer for another try.
    assert page.input_value("#question") == COLOR
    assert page.locator("#attachments img").count() == 1
    # A key that cannot go in a header is refused in words before anything is sent.
    page.fill("#api-key", "cl\u00e9")
    page.press("#question", "Enter")
    expect(page.locator("#notice")).to_have_text(
        "The API key can only hold printable ASCII characters; check what was pasted."
    )
    assert page.locator(".turn.error").count() == 1
    page.fill("#api-key", "wrong")
    page.press("#question", "Enter")
    assert "Incorrect API key provided." in error_shown(page, 1)
    page.fill("#api-key", KEY)
    page.press("#question", "Enter")
    assert answered(page, 0)[0] == color
    # The key went in the Authorization header only: never in a URL, kept for this tab.
    last = [r for r in tab.requests if r.url.endswith("/v1/chat/completions")][-1]
    assert last.headers["authorization"] == f"Bearer {KEY}"
    assert not [r.url for r in tab.requests if KEY in r.url]
    assert KEY not in page.url
    assert page.evaluate("sessionStorage.getItem('idefics-kit.api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    # The models list loads with the key, and after a reload the key is still there.
    page.reload()
    assert page.input_value("#api-key") == KEY
    expect(page.locator("#model option")).to_have_text(["toy"])
    expect(page.locator("#notice")).to_have_text("")
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_server_errors_are_shown_in_words_and_the_page_keeps_working(
    tab: Tab, toy_url: str, keyed_url: str, tmp_path: Path
) -> None:
    page = open_page(tab, toy_url + "/")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    ask(page, COLOR, broken)
    # The server's own message, word for word.
    expected = httpx.post(
        f"{toy_url}/v1/chat/completions",
        json={"messages": tab.chats()[0]["messages"], "stream": True},
        timeout=30,
    )
    message = assert_openai_error(expected, 400, "invalid_image")["message"]
    assert error_shown(page, 0) == f"Error 400: {message}"
    page.click("#attachments .remove")
    picture, color = scene_png(tmp_path, "yellow", seed=31)
    ask(page, COLOR, picture)
    assert answered(page, 0)[0] == color
    # The failed question is not part of the conversation that goes on.
    assert [m["role"] for m in tab.chats()[1]["messages"]] == ["user"]

    # 503 with Retry-After (here from a stand-in answer): the page says when to try again.
    def overloaded(route: Any) -> None:
        body = {"error": {"message": "The server is overloaded.", "type": "server_error"}}
        route.fulfill(status=503, headers={"Retry-After": "7"}, json=body)

    page.route("**/v1/chat/completions", overloaded)
    ask(page, COLOR, picture)
    assert error_shown(page, 1) == "Error 503: The server is overloaded. Try again in 7 s."
    page.unroute("**/v1/chat/completions")
    page.press("#question", "Enter")  # the composer was restored: same question, same picture
    assert answered(page, 1)[0] == color
    assert [m["role"] for m in tab.chats()[-1]["messages"]] == ["user", "assistant", "user"]
    tab.assert_clean()

    # A server limit: one image per request on the keyed server.
    page = open_page(tab, keyed_url + "/")
    page.fill("#api-key", KEY)
    other, _ = scene_png(tmp_path, "blue", seed=32)
    ask(page, COLOR, picture, other)
    assert error_shown(page, 0) == (
        "Error 400: too many images: this server takes at most 1 per request"
    )
    page.locator("#attachments .remove").nth(1).click()
    page.press("#question", "Enter")
    assert answered(page, 0)[0] == color
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_stop_keeps_the_part_received(tab: Tab) -> None:
    fake = FakeGenerator(pieces=tuple(f" w{i}" for i in range(100)), delay=0.05)
    with serving(create_app(fake, served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        page = open_page(tab, url + "/")
        ask(page, "Talk.")
        turn = page.locator(".turn.assistant").first
        turn.locator(".text").filter(has_text="w2").wait_for()
        page.click("#stop")
        text, stats = answered(page, 0)
        assert stats.startswith("stopped · ~")
        assert text.startswith(" w0 w1 w2")
        assert len(text) < len("".join(fake.pieces))
        # The server saw the client go and closed the stream.
        deadline = time.monotonic() + 10
        while fake.closed_streams < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.closed_streams == 1
        # The part received is the assistant turn of the conversation that goes on.
        assert page.is_visible("#send")
        fake.pieces = [" done"]
        ask(page, "More.")
        answered(page, 1)
        history = tab.chats()[1]["messages"]
        assert [m["role"] for m in history] == ["user", "assistant", "user"]
        assert history[1]["content"] == text
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.slow
def test_a_body_over_the_limit_gets_413_in_words(tab: Tab, tmp_path: Path) -> None:
    """The server answers 413 from Content-Length and closes: the browser still shows why."""
    app = create_app(FakeGenerator(), served_model_name=MODEL, max_request_bytes=4096)  # type: ignore[arg-type]
    with serving(app) as url:
        page = open_page(tab, url + "/")
        picture = tmp_path / "noise.png"
        noise(64, 64, seed=41).save(picture)
        assert picture.stat().st_size > 4096
        ask(page, COLOR, picture)
        shown = error_shown(page, 0)
        assert re.fullmatch(
            r"Error 413: The request body is too large \(declared \d+ bytes\); this server "
            r"takes at most 4096 bytes\. Send smaller or fewer images\.",
            shown,
        ), shown
        page.click("#attachments .remove")
        ask(page, "Hello?")
        assert answered(page, 0)[0] == "a red circle"
    tab.assert_clean()
