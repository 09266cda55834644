"""``idefics-kit serve``: the OpenAI-compatible server, over loopback.

Two kinds of tests. Protocol tests (errors, auth, limits, image policy, SSE
shape, metrics) drive the app with :class:`FakeGenerator`, a scripted
stand-in with the Generator's async surface, so they are fast and exact. The
toy-model tests serve the real built-in model through uvicorn on 127.0.0.1
and ask it with the real ``openai`` client (sync and async) and httpx: right
answers to colour and shape questions about pictures sent as ``data:`` URIs,
streaming that joins to the plain answer, 64 concurrent clients, a
disconnecting client freeing its row, backpressure, and a SIGTERM drain of
the ``idefics-kit serve`` process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from idefics_kit import Conversation, GenerationOptions, Generator, ImagePart, Result, Usage
from idefics_kit.errors import GenerationError, InvalidParameterError
from idefics_kit.server import ServerApp, create_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
MODEL = "toy"


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def serving(app: Any, **settings: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL.

    ``settings`` are extra ``uvicorn.Config`` settings (``root_path``, ...).
    """
    config = uvicorn.Config(
        app,
        **{
            "host": "127.0.0.1",
            "port": 0,
            "log_level": "warning",
            "lifespan": "on",
            "access_log": False,
            **settings,
        },
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def data_uri(path_or_image: Path | Image.Image) -> str:
    if isinstance(path_or_image, Path):
        data = path_or_image.read_bytes()
    else:
        buffer = io.BytesIO()
        path_or_image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(url: str, question: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


# -- a scripted generator ------------------------------------------------------------------


@dataclass
class FakeStats:
    queued: int = 0
    running: int = 0
    batches: int = 3
    rows: int = 5
    completed: int = 5
    cancelled: int = 0
    generated_tokens: int = 42
    busy_seconds: float = 2.0

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.batches

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.busy_seconds


class FakeStream:
    def __init__(self, owner: FakeGenerator, pieces: list[str]) -> None:
        self._owner = owner
        self._pieces = list(pieces)
        self.result: Result | None = None
        self.closed = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> str:
        if self._owner.error is not None:
            raise self._owner.error
        if self.closed or not self._pieces:
            if not self.closed:
                self.result = self._owner.result()
            raise StopAsyncIteration
        await asyncio.sleep(self._owner.delay)
        return self._pieces.pop(0)

    async def aclose(self) -> None:
        self.closed = True
        self._owner.closed_streams += 1


class FakeGenerator:
    """The Generator's async surface, scripted: replies ``pieces`` joined, records calls."""

    def __init__(self, pieces: tuple[str, ...] = ("a red", " circle"), delay: float = 0.0) -> None:
        self.pieces = list(pieces)
        self.delay = delay
        self.error: BaseException | None = None
        self.calls: list[tuple[Conversation, GenerationOptions | None]] = []
        self.closed_streams = 0
        self.ready = True

    def result(self) -> Result:
        text = "".join(self.pieces)
        return Result(
            text=text,
            token_ids=tuple(range(len(self.pieces))),
            finish_reason="stop",
            usage=Usage(prompt_tokens=7, completion_tokens=len(self.pieces)),
        )

    async def agenerate(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Result:
        self.calls.append((conversation, options))
        if self.error is not None:
            raise self.error
        await asyncio.sleep(self.delay * len(self.pieces))
        return self.result()

    def astream(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> FakeStream:
        self.calls.append((conversation, options))
        return FakeStream(self, self.pieces)

    def stats(self) -> FakeStats:
        return FakeStats()


@pytest.fixture
def fake() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture
def fake_url(fake: FakeGenerator) -> Iterator[str]:
    with serving(create_app(fake, served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        yield url


RED = data_uri(EXAMPLES / "red_circle.png")


def chat(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, **kwargs)


# -- protocol tests (fake generator) ---------------------------------------------------------


def test_completion_shape_and_options_reach_the_generator(
    fake: FakeGenerator, fake_url: str
) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": RED}},
                    {"type": "text", "text": "Color?"},
                ],
            },
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the shape?"},
        ],
        "max_completion_tokens": 9,
        "max_tokens": 99,  # max_completion_tokens wins
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n", "."],
        "n": 1,
        "user": "someone",  # known but ignored
        "some_future_field": {"x": 1},  # unknown: ignored
    }
    response = chat(fake_url, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert response.headers["x-request-id"] == data["id"]
    assert data["model"] == MODEL
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "a red circle", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert data["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    conversation, options = fake.calls[-1]
    assert options == GenerationOptions(
        max_new_tokens=9, temperature=0.5, top_p=0.9, seed=3, stop=("\n", ".")
    )
    assert conversation.system == "Answer in one word."
    assert [turn.role for turn in conversation.turns] == ["user", "assistant", "user"]
    image = conversation.turns[0].parts[0]
    assert isinstance(image, ImagePart)
    # Decoded by the server in a worker thread, before the engine sees it.
    assert image.kind == "pil"
    assert image.load().getpixel((5, 5)) is not None


def test_streaming_shape_with_usage(fake_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{fake_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "a red circle"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def test_streaming_without_usage_has_no_usage_key(fake_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{fake_url}/v1/chat/completions", json=body, timeout=30) as response:
        chunks = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line and line != "data: [DONE]"
        ]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": []}, "messages", None),
        ({"messages": "hi"}, "messages", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_role"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "messages[1].role",
            "invalid_role",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", None),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
            None,
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url",
            "invalid_image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}],
                    }
                ]
            },
            "messages[0].content[0].image_url",
            "invalid_image_url",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "unsupported_value"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
            "unsupported_parameter",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5},
            "presence_penalty",
            "unsupported_parameter",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", None),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", None),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", None),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "9"},
            "max_completion_tokens",
            None,
        ),
        ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed", None),
        ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop", None),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", None),
        ([1, 2], "body", None),
    ],
    ids=lambda v: None,
)
def test_bad_requests_get_400_naming_the_field(
    fake_url: str, body: Any, param: str, code: str | None
) -> None:
    error = assert_openai_error(chat(fake_url, body), 400, code)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_bad_json_and_too_many_images(fake: FakeGenerator) -> None:
    app = create_app(fake, served_model_name=MODEL, max_images_per_request=2)  # type: ignore[arg-type]
    with serving(app) as url:
        response = httpx.post(
            f"{url}/v1/chat/completions",
            content=b'{"messages": [',
            headers={"content-type": "application/json"},
        )
        assert assert_openai_error(response, 400, "invalid_json")["param"] is None
        parts = [{"type": "image_url", "image_url": {"url": RED}}] * 3
        error = assert_openai_error(
            chat(url, {"messages": [{"role": "user", "content": parts}]}), 400, "too_many_images"
        )
        assert "at most 2" in error["message"]
        two = {"messages": [{"role": "user", "content": parts[:2]}]}
        assert chat(url, two).status_code == 200


def test_unknown_model_404_and_models_list(fake_url: str) -> None:
    error = assert_openai_error(
        chat(fake_url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
        404,
        "model_not_found",
    )
    assert error["param"] == "model"
    models = httpx.get(f"{fake_url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{fake_url}/v1/models/{MODEL}").json()["id"] == MODEL
    assert_openai_error(httpx.get(f"{fake_url}/v1/models/other"), 404, "model_not_found")
    assert_openai_error(httpx.get(f"{fake_url}/v1/nothing"), 404, "not_found")
    assert_openai_error(httpx.get(f"{fake_url}/v1/chat/completions"), 405, "method_not_allowed")


def test_api_key(fake: FakeGenerator) -> None:
    with serving(create_app(fake, served_model_name=MODEL, api_key="s3cret")) as url:  # type: ignore[arg-type]
        body = {"messages": [{"role": "user", "content": "x"}]}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ):
            response = chat(url, body, headers=headers)
            assert assert_openai_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
        assert chat(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # Health stays open (probes carry no key); metrics need the key unless a flag says so.
        assert httpx.get(f"{url}/health").status_code == 200
        assert_openai_error(httpx.get(f"{url}/metrics"), 401, "invalid_api_key")
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/metrics", headers=key).status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [MODEL]


def raw_request(url: str, head: bytes, body_prefix: bytes) -> tuple[bytes, float]:
    """Send ``head`` and only ``body_prefix``; return the response the server sends anyway."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(head + body_prefix)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return received, time.monotonic() - started


def test_oversized_body_refused_before_it_is_read(fake: FakeGenerator) -> None:
    with serving(create_app(fake, served_model_name=MODEL, max_request_bytes=1000)) as url:  # type: ignore[arg-type]
        # Declared too large: 413 with only 10 of the 10 MB sent.
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        received, seconds = raw_request(url, head, b'{"messages"')
        assert received.startswith(b"HTTP/1.1 413 "), received
        error = json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_too_large"
        assert error["type"] == "invalid_request_error"
        assert seconds < 5
        # Chunked, no length: refused once more than the limit has arrived, the rest never sent.
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 600
        received, _ = raw_request(url, head, b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
        assert received.startswith(b"HTTP/1.1 413 "), received
        assert not fake.calls
        # Just under the limit is fine.
        small = {"messages": [{"role": "user", "content": "x" * 800}]}
        assert chat(url, small).status_code == 200


def test_unexpected_failure_is_500_without_traceback(
    fake: FakeGenerator, fake_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake.error = ZeroDivisionError("secret internal detail")
    body = {"messages": [{"role": "user", "content": "x"}]}
    with caplog.at_level(logging.ERROR, logger="idefics_kit.server"):
        response = chat(fake_url, body)
    error = assert_openai_error(response, 500, "internal_error")
    assert error["type"] == "server_error"
    assert "secret" not in response.text
    assert "ZeroDivision" not in response.text
    assert response.headers["x-request-id"] in error["message"]
    assert "ZeroDivisionError: secret internal detail" in caplog.text  # the log has the traceback
    request_id = re.search(r"chatcmpl-[0-9a-f]+", error["message"])
    assert request_id is not None
    assert request_id.group() in caplog.text
    # The SDK's own runtime failures too.
    fake.error = GenerationError("CUDA error: device-side assert")
    assert "CUDA" not in assert_openai_error(chat(fake_url, body), 500)["message"]
    # A stream failing after its 200 went out ends with an error event, then [DONE].
    fake.error = None
    stream = FakeGenerator(pieces=("a", "b"))
    with serving(create_app(stream, served_model_name=MODEL)) as url:  # type: ignore[arg-type]
        original = stream.result
        stream.result = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}
        ) as response:
            lines = [line for line in response.iter_lines() if line]
        stream.result = original  # type: ignore[method-assign]
    assert json.loads(lines[-2][6:])["error"]["code"] == "internal_error"
    assert lines[-1] == "data: [DONE]"
    client = openai.OpenAI(base_url=f"{fake_url}/v1", api_key="x", max_retries=0)
    fake.error = GenerationError("x")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_sdk_errors_map_to_statuses(fake: FakeGenerator, fake_url: str) -> None:
    import idefics_kit.errors as sdk

    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    fake.error = InvalidParameterError(
        "max_new_tokens", "prompt plus max_new_tokens exceeds the context", 5
    )
    assert assert_openai_error(chat(fake_url, body), 400)["param"] == "max_tokens"
    fake.error = sdk.OverloadedError("the queue is full (max_queued=1)")
    response = chat(fake_url, body)
    assert assert_openai_error(response, 503, "overloaded")["type"] == "server_error"
    assert response.headers["retry-after"] == "1"
    fake.error = sdk.RequestTimeoutError("no answer within 1 s")
    assert_openai_error(chat(fake_url, body), 504, "timeout")
    fake.error = sdk.GeneratorClosedError("closed")
    assert_openai_error(chat(fake_url, body), 503, "shutting_down")
    # The same errors before a stream's 200 get their own status, not a broken stream.
    fake.error = sdk.OverloadedError("full")
    response = chat(fake_url, {**body, "stream": True})
    assert_openai_error(response, 503, "overloaded")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition ``text`` parsed by prometheus_client: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_text(fake_url: str) -> None:
    # Written by prometheus_client since issue 20 (was by hand: values are now floats,
    # labels sorted, and counters have _created series): parsed here, not matched as text.
    for _ in range(2):
        assert chat(fake_url, {"messages": [{"role": "user", "content": "x"}]}).status_code == 200
    chat(fake_url, {"messages": []})
    text = httpx.get(f"{fake_url}/metrics").text
    values = samples(text)
    route = ("route", "/v1/chat/completions")
    requests = "idefics_kit_http_requests_total"
    assert values[(requests, (("method", "POST"), route, ("status", "200")))] == 2
    assert values[(requests, (("method", "POST"), route, ("status", "400")))] == 1
    assert values[("idefics_kit_prompt_tokens_total", ())] == 14
    assert values[("idefics_kit_completion_tokens_total", ())] == 4
    assert values[("idefics_kit_completions_total", (("finish_reason", "stop"),))] == 2
    duration = "idefics_kit_http_request_duration_seconds"
    assert values[(f"{duration}_bucket", (("le", "+Inf"), route))] == 3
    assert values[(f"{duration}_count", (route,))] == 3
    assert values[("idefics_kit_engine_mean_batch_size", ())] == pytest.approx(5 / 3)
    assert values[("idefics_kit_engine_tokens_per_second", ())] == 21.0
    assert values[("idefics_kit_engine_batches_total", ())] == 3
    assert "# TYPE idefics_kit_http_request_duration_seconds histogram" in text
    assert (
        httpx.get(f"{fake_url}/metrics")
        .headers["content-type"]
        .startswith("text/plain; version=0.0.4")
    )


def test_access_log_line(fake_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="idefics_kit.server.access"):
        chat(fake_url, {"messages": [{"role": "user", "content": "x"}]})
        httpx.get(f"{fake_url}/health")
        # The line is written just after the response went out.
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "idefics_kit.server.access"]
    assert re.fullmatch(
        r'127\.0\.0\.1:\d+ "POST /v1/chat/completions" 200 tokens=7\+2 \d+\.\d{3}s chatcmpl-[0-9a-f]{32}',
        lines[0],
    ), lines
    assert re.fullmatch(
        r'127\.0\.0\.1:\d+ "GET /health" 200 tokens=- \d+\.\d{3}s chatcmpl-[0-9a-f]{32}', lines[1]
    ), lines


def test_drain_refuses_new_requests(fake: FakeGenerator) -> None:
    app = create_app(fake, served_model_name=MODEL)  # type: ignore[arg-type]
    with serving(app) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        app.begin_drain()
        response = chat(url, {"messages": [{"role": "user", "content": "x"}]})
        assert_openai_error(response, 503, "shutting_down")
        assert response.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/health").status_code == 503
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_client_disconnect_cancels_the_stream(fake: FakeGenerator) -> None:
    slow = FakeGenerator(pieces=tuple(f"w{i} " for i in range(200)), delay=0.05)
    app = create_app(slow, served_model_name=MODEL)  # type: ignore[arg-type]
    with serving(app) as url:
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
        deadline = time.monotonic() + 5
        while (slow.closed_streams == 0 or app.in_flight) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.closed_streams == 1
        assert app.in_flight == 0
        # A non-streamed request whose client leaves is cancelled too (nothing is sent).
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 5
        while app.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.in_flight == 0
        assert 'status="499"} 2' in httpx.get(f"{url}/metrics").text


# -- images: URLs and local files ----------------------------------------------------------


@contextlib.contextmanager
def image_server() -> Iterator[str]:
    png = (EXAMPLES / "red_circle.png").read_bytes()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/red.png"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_loopback_url_refused_without_the_flag(fake: FakeGenerator, fake_url: str) -> None:
    with image_server() as image_url:
        error = assert_openai_error(
            chat(fake_url, {"messages": image_message(image_url, "Color?")}), 400, "invalid_image"
        )
        assert "private/loopback" in error["message"]
        assert "allow_private_network" in error["message"]
        assert not fake.calls
        with serving(create_app(fake, served_model_name=MODEL, allow_private_network=True)) as url:  # type: ignore[arg-type]
            assert chat(url, {"messages": image_message(image_url, "Color?")}).status_code == 200
        image = fake.calls[-1][0].turns[0].parts[0]
        with Image.open(EXAMPLES / "red_circle.png") as original:
            assert isinstance(image, ImagePart)
            assert image.load().size == original.size


def test_local_files_only_inside_the_allowed_folder(
    fake: FakeGenerator, fake_url: str, tmp_path: Path
) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    inside = allowed / "red.png"
    inside.write_bytes((EXAMPLES / "red_circle.png").read_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(inside.read_bytes())
    (allowed / "link.png").symlink_to(outside)
    error = assert_openai_error(
        chat(fake_url, {"messages": image_message(inside.as_uri(), "x")}), 400, "invalid_image_url"
    )
    assert "--allowed-local-media-path" in error["message"]
    assert_openai_error(
        chat(fake_url, {"messages": image_message(str(inside), "x")}), 400, "invalid_image_url"
    )
    with serving(
        create_app(fake, served_model_name=MODEL, allowed_local_media_path=str(allowed))
    ) as url:  # type: ignore[arg-type]
        assert chat(url, {"messages": image_message(inside.as_uri(), "x")}).status_code == 200
        assert chat(url, {"messages": image_message(str(inside), "x")}).status_code == 200
        for refused in (
            outside.as_uri(),
            str(allowed / ".." / "secret.png"),
            (allowed / "link.png").as_uri(),
            "relative.png",
            "file://otherhost/etc/passwd",
        ):
            assert_openai_error(
                chat(url, {"messages": image_message(refused, "x")}), 400, "invalid_image_url"
            )
        missing = assert_openai_error(
            chat(url, {"messages": image_message(str(allowed / "nope.png"), "x")}),
            400,
            "invalid_image",
        )
        assert "not found" in missing["message"]


def test_import_idefics_kit_does_not_import_the_server() -> None:
    code = "import sys, idefics_kit, idefics_kit.cli; print(any(m.split('.')[0] in ('starlette', 'uvicorn') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the toy model, served for real --------------------------------------------------------

EXAMPLE_ANSWERS = {
    "red_circle.png": {"color": "red", "shape": "circle"},
    "blue_square.png": {"color": "blue", "shape": "square"},
    "green_triangle.png": {"color": "green", "shape": "triangle"},
}
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is it?"}
# (data URI, question, right answer): six questions with six different answers.
CASES = [
    (data_uri(EXAMPLES / name), QUESTIONS[kind], answer)
    for name, answers in EXAMPLE_ANSWERS.items()
    for kind, answer in answers.items()
]


@pytest.fixture(scope="module")
def toy() -> Iterator[Generator]:
    gen = Generator.from_pretrained("toy", device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def toy_app(toy: Generator) -> ServerApp:
    return create_app(toy, served_model_name=MODEL)


@pytest.fixture(scope="module")
def toy_url(toy_app: ServerApp) -> Iterator[str]:
    with serving(toy_app) as url:
        yield url


def test_toy_answers_colour_and_shape_questions(toy: Generator, toy_url: str) -> None:
    client = openai.OpenAI(base_url=f"{toy_url}/v1", api_key="unused", max_retries=0)
    for url, question, answer in CASES:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=image_message(url, question),
            max_tokens=12,  # type: ignore[arg-type]
        )
        assert completion.choices[0].message.content == answer
        assert completion.choices[0].finish_reason == "stop"
        # Usage is the SDK's: the same prompt the Generator builds in-process.
        conversation = Conversation().user(ImagePart.from_base64(url), question)
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == len(toy.prompt_token_ids(conversation))
        assert completion.usage.completion_tokens == 1


def test_toy_stream_joins_to_the_plain_answer(toy_url: str) -> None:
    client = openai.OpenAI(base_url=f"{toy_url}/v1", api_key="unused", max_retries=0)
    messages = image_message(CASES[0][0], "Describe this image.")
    plain = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert plain.choices[0].message.content == "a red circle on the left"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, piece by piece
    assert "".join(pieces) == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"
    assert set(finish[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    # max_tokens cuts it: finish_reason "length", in both modes.
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None
    assert short.usage.completion_tokens == 2
    streamed = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=2,
            stream=True,
        )
    )
    assert streamed[-1].choices[0].finish_reason == "length"
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed)
        == short.choices[0].message.content
    )


def test_64_concurrent_clients_all_answered_right(toy: Generator, toy_url: str) -> None:
    clients, per_client = 64, 4
    batches_before = toy.stats().batches

    async def one_client(client: openai.AsyncOpenAI, number: int) -> list[tuple[str, str, str]]:
        answers = []
        for k in range(per_client):
            url, question, answer = CASES[(number * per_client + k + number // 6) % len(CASES)]
            if k == 3:  # one of the four is streamed
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=image_message(url, question),  # type: ignore[arg-type]
                    max_tokens=12,
                    stream=True,
                )
                text = "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )
                answers.append((f"stream-{number}-{k}", text, answer))
            else:
                completion = await client.chat.completions.create(
                    model=MODEL,
                    messages=image_message(url, question),  # type: ignore[arg-type]
                    max_tokens=12,
                )
                answers.append((completion.id, completion.choices[0].message.content or "", answer))
        return answers

    async def main() -> list[tuple[str, str, str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{toy_url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            results = await asyncio.gather(*(one_client(client, n) for n in range(clients)))
        return [answer for answers in results for answer in answers]

    started = time.monotonic()
    answers = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert len(answers) == clients * per_client
    assert len({request_id for request_id, _, _ in answers}) == clients * per_client
    wrong = [(text, expected) for _, text, expected in answers if text != expected]
    assert not wrong, wrong
    stats = toy.stats()
    # Concurrent clients shared batches: far fewer batches than requests.
    assert stats.batches - batches_before < clients * per_client / 2, (stats, elapsed)


def test_toy_logprobs_plain_and_streamed(toy_url: str) -> None:
    client = openai.OpenAI(base_url=f"{toy_url}/v1", api_key="unused", max_retries=0)
    messages = image_message(CASES[0][0], "Describe this image.")
    plain = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=2,
    )
    logprobs = plain.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    tokens = logprobs.content
    assert "".join(t.token for t in tokens).strip() == plain.choices[0].message.content
    assert len(tokens) == plain.usage.completion_tokens  # type: ignore[union-attr]
    for token in tokens:
        assert token.logprob <= 0
        assert bytes(token.bytes or []).decode() == token.token
        assert len(token.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert token.top_logprobs[0].token == token.token
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
    )
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]
    plain_off = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert plain_off.choices[0].logprobs is None
    error = assert_openai_error(
        httpx.post(
            f"{toy_url}/v1/chat/completions",
            json={"messages": messages, "top_logprobs": 2},
        ),
        400,
    )
    assert error["param"] == "top_logprobs"


def test_toy_structured_outputs(toy_url: str) -> None:
    client = openai.OpenAI(base_url=f"{toy_url}/v1", api_key="unused", max_retries=0)
    url, question, _ = CASES[0]  # red circle, colour
    messages = image_message(url, question)
    # The right answer is not among the choices: the constraint still holds.
    forced = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        extra_body={"structured_outputs": {"choice": ["blue", "green"]}},
    )
    assert forced.choices[0].message.content in ("blue", "green")
    regex = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        extra_body={"guided_regex": "(red|blue) circle"},
        max_tokens=8,
    )
    assert regex.choices[0].message.content == "red circle"
    # The toy vocabulary has no token that can start JSON: a clear 400 naming the field.
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}},
    ):
        response = httpx.post(
            f"{toy_url}/v1/chat/completions",
            json={"messages": messages, "response_format": response_format},
            timeout=60,
        )
        assert assert_openai_error(response, 400)["param"] == "response_format"
    bad = httpx.post(
        f"{toy_url}/v1/chat/completions",
        json={"messages": messages, "response_format": {"type": "yaml"}},
    )
    assert assert_openai_error(bad, 400)["param"] == "response_format.type"
    both = httpx.post(
        f"{toy_url}/v1/chat/completions",
        json={"messages": messages, "guided_regex": "x", "guided_choice": ["a"]},
    )
    assert assert_openai_error(both, 400)["param"] == "guided_choice"


def test_toy_metrics_after_traffic(toy_url: str) -> None:
    httpx.post(
        f"{toy_url}/v1/chat/completions",
        json={"model": MODEL, "messages": image_message(CASES[0][0], CASES[0][1])},
        timeout=60,
    )
    values = samples(httpx.get(f"{toy_url}/metrics").text)
    assert values[("idefics_kit_engine_mean_batch_size", ())] >= 1.0
    assert values[("idefics_kit_engine_generated_tokens_total", ())] >= 1
    assert values[("idefics_kit_prompt_tokens_total", ())] >= 1
    assert values[("idefics_kit_engine_queued_requests", ())] == 0
    # Where the answered request's time went, one observation per stage.
    for stage in ("prepare", "queue", "prefill", "decode"):
        labels = (("stage", stage),)
        assert values[("idefics_kit_engine_request_stage_seconds_count", labels)] >= 1
        assert values[("idefics_kit_engine_request_stage_seconds_sum", labels)] >= 0
    assert values[("idefics_kit_engine_request_stage_seconds_sum", (("stage", "prefill"),))] > 0


# -- long answers: a tiny random checkpoint that talks until max_tokens ----------------------


@pytest.fixture(scope="module")
def chatty_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from idefics_kit.testing import build_tiny_checkpoint

    return build_tiny_checkpoint("idefics3", tmp_path_factory.mktemp("chatty") / "idefics3")


@pytest.fixture(scope="module")
def chatty(chatty_path: Path) -> Iterator[Generator]:
    # One row at a time and one waiting: a row left running would delay everyone.
    gen = Generator.from_pretrained(chatty_path, device="cpu", max_batch_size=1, max_queued=1)
    yield gen
    gen.close()


# Within the tiny checkpoint's 64 px (its processor's longest edge), so the server passes
# the image on as decoded: a larger one is scaled down by the server first (issue 20), and
# this random model talks to max_tokens only for some pictures.
with Image.open(EXAMPLES / "red_circle.png") as _red:
    SMALL_RED = data_uri(_red.convert("RGB").resize((48, 32)))


def long_request(max_tokens: int, *, stream: bool) -> dict[str, Any]:
    return {
        "messages": image_message(SMALL_RED, "Describe this image."),
        "max_tokens": max_tokens,
        "stream": stream,
    }


def wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_row_and_full_queue_gets_503(chatty: Generator) -> None:
    app = create_app(chatty, served_model_name=MODEL)
    with serving(app) as url:
        started = time.monotonic()
        short = httpx.post(
            f"{url}/v1/chat/completions", json=long_request(10, stream=False), timeout=60
        )
        solo = time.monotonic() - started
        assert short.json()["choices"][0]["finish_reason"] == "length"
        cancelled = chatty.stats().cancelled

        # A stream of 1900 tokens would hold the only row for tens of seconds.
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=long_request(1900, stream=True), timeout=60
        ) as response:
            lines = (line for line in response.iter_lines() if line)
            for _ in range(4):
                assert next(lines).startswith("data: ")
            assert chatty.stats().running == 1
            # While it runs: one more may wait (max_queued=1), the next is refused at once.
            waiting = threading.Thread(
                target=httpx.post,
                args=(f"{url}/v1/chat/completions",),
                kwargs={"json": long_request(10, stream=False), "timeout": 60},
            )
            waiting.start()
            wait_for(lambda: chatty.stats().queued == 1)
            refused = httpx.post(
                f"{url}/v1/chat/completions", json=long_request(10, stream=False), timeout=10
            )
            assert_openai_error(refused, 503, "overloaded")
            assert refused.headers["retry-after"] == "1"
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(
                    model=MODEL, messages=long_request(10, stream=False)["messages"]
                )
            assert info.value.status_code == 503
        # The client is gone: its row is freed at the next step, the waiting one runs.
        waiting.join(30)
        assert not waiting.is_alive()
        wait_for(lambda: chatty.stats().cancelled == cancelled + 1 and app.in_flight == 0)
        started = time.monotonic()
        after = httpx.post(
            f"{url}/v1/chat/completions", json=long_request(10, stream=False), timeout=60
        )
        assert after.status_code == 200
        # Not delayed by the abandoned 1900-token stream (which would take ~100 x solo).
        assert time.monotonic() - started < max(5.0, 10 * solo)
        assert chatty.stats().running == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_sigterm_drains_then_exits_0(chatty_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "idefics_kit", "serve", "--model", str(chatty_path),
        "--served-model-name", MODEL, "--port", str(port), "--drain-seconds", "60",
        "--access-log", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:

        def healthy() -> bool:
            # Cheap polls: a busy loop of HTTP clients would slow the loading server down.
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    return False
            return httpx.get(f"{url}/health", timeout=5).status_code == 200

        wait_for(healthy, 120)
        chunks: list[str] = []
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=long_request(800, stream=True), timeout=60
        ) as response:
            lines = (line for line in response.iter_lines() if line)
            chunks.append(next(lines))
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503)
            refused = httpx.post(
                f"{url}/v1/chat/completions", json=long_request(5, stream=False), timeout=10
            )
            assert_openai_error(refused, 503, "shutting_down")
            chunks.extend(lines)
        # The stream in flight ran to its end.
        assert chunks[-1] == "data: [DONE]"
        final = json.loads([c for c in chunks if c.startswith("data: {")][-1][6:])
        assert final["choices"][0]["finish_reason"] == "length"
        stopped = time.monotonic()
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert time.monotonic() - stopped < 30, err
        assert "draining" in err
        # The access log: one line per request, with its tokens.
        assert re.search(r'"POST /v1/chat/completions" 200 tokens=\d+\+800 ', out), out
        assert re.search(r'"POST /v1/chat/completions" 503 tokens=- ', out), out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_in_process_with_httpx_asgi_transport(fake: FakeGenerator) -> None:
    # No socket: an application can test (or mount) the app as a plain ASGI callable.
    app = create_app(fake, served_model_name=MODEL, api_key="k")

    async def main() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"Authorization": "Bearer k"}
            body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
            plain = await client.post("/v1/chat/completions", json=body, headers=headers)
            streamed = await client.post(
                "/v1/chat/completions", json={**body, "stream": True}, headers=headers
            )
            return plain, streamed

    plain, streamed = asyncio.run(main())
    assert plain.json()["choices"][0]["message"]["content"] == "a red circle"
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert app.in_flight == 0


def test_serve_flags_are_checked_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from idefics_kit.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port: must be a port number 0-65535" in capsys.readouterr().err
    assert main(["serve", "--max-request-bytes", "0"]) == 2
    assert main(["serve", "--drain-seconds", "-1"]) == 2
    assert main(["serve", "--body-timeout", "0"]) == 2
    assert "--body-timeout: must be a number of seconds > 0, got '0'" in capsys.readouterr().err
    assert main(["serve", "--max-decoded-pixels", "0"]) == 2
    assert main(["serve", "--allowed-local-media-path", "/no/such/folder"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--served-model-name",
        "--api-key",
        "--max-queued",
        "--access-log",
        "--drain-seconds",
        "--metrics-without-key",
        "--body-timeout",
        "--max-receiving-requests",
        "--max-decoded-pixels",
        "--image-timeout",
        "--max-downloads-per-request",
    ):
        assert flag in text


def test_concurrent_request_bound_503_once_the_body_is_in() -> None:
    slow = FakeGenerator(pieces=("a",) * 20, delay=0.05)
    app = create_app(slow, served_model_name=MODEL, max_concurrent_requests=1)  # type: ignore[arg-type]
    with serving(app) as url:
        body = {"messages": [{"role": "user", "content": "x"}]}
        first = threading.Thread(target=chat, args=(url, body))
        first.start()
        wait_for(lambda: app.in_flight == 1)
        response = chat(url, body)
        error = assert_openai_error(response, 503, "overloaded")
        assert "1 requests are being answered" in error["message"]
        assert response.headers["retry-after"] == "1"
        first.join(10)
        assert chat(url, body).status_code == 200


def test_disconnect_before_the_first_piece_closes_the_stream() -> None:
    slow = FakeGenerator(pieces=("late",), delay=5.0)
    app = create_app(slow, served_model_name=MODEL)  # type: ignore[arg-type]
    with serving(app) as url:
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        wait_for(lambda: slow.closed_streams == 1 and app.in_flight == 0)


def test_response_format_json_schema_gives_valid_json(chatty_path: Path) -> None:
    # A byte-level vocabulary can spell any JSON: every answer must parse and
    # validate, even from random weights.
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["color", "count"],
        "additionalProperties": False,
    }
    gen = Generator.from_pretrained(chatty_path, device="cpu")
    try:
        with serving(create_app(gen, served_model_name=MODEL)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for question in ("What is it?", "Count the shapes.", "Describe this image."):
                answer = client.chat.completions.create(
                    model=MODEL,
                    messages=image_message(CASES[0][0], question),  # type: ignore[arg-type]
                    max_tokens=64,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "shape", "schema": schema},
                    },
                )
                assert answer.choices[0].finish_reason == "stop"
                content = answer.choices[0].message.content
                assert content is not None
                jsonschema.validate(json.loads(content), schema)
    finally:
        gen.close()
