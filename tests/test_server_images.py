"""Issue 20: images are scaled down right after decoding, to what the processor uses.

The server keeps only the scaled copy of each image, so a request of eight
4096x4096 pictures holds kilobytes, not gigabytes. The scale-down must be
invisible to the model: an image already within the processor's size is
passed on exactly as decoded (same answers and log-probabilities as
in-process, in every family), and a larger one is shrunk only to the size the
processor would resize it to anyway (the same number of image tokens).
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from idefics_kit import Conversation, GenerationOptions, Generator, ImagePart
from idefics_kit.errors import InvalidParameterError
from idefics_kit.server import create_app
from idefics_kit.server.chat import image_fit
from tests.conftest import picture


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(gen: Generator, image: Image.Image, question: str) -> dict[str, Any]:
    """One greedy chat completion with logprobs, through the app in-process."""
    app = create_app(gen, served_model_name="m")
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_uri(image)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
    }

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=120)

    response = asyncio.run(main())
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def in_process(gen: Generator, image: Image.Image, question: str) -> Any:
    conversation = Conversation().user(ImagePart.from_pil(image), question)
    options = GenerationOptions(max_new_tokens=6, logprobs=True, top_logprobs=2)
    return gen.generate(conversation, options)


def test_load_scales_down_only_larger_images() -> None:
    original = picture(192, 128, seed=1)
    part = ImagePart.from_pil(original)
    within = part.load(max_size=(192, 128))
    assert within.tobytes() == part.load().tobytes()
    assert part.load(max_size=(500, 500)).tobytes() == part.load().tobytes()
    assert part.load(max_size=(96, 96)).size == (96, 64)  # the longest edge, aspect kept
    assert part.load(max_size=(100, 50)).size == (75, 50)
    assert part.load(max_size=(96, 96), keep_aspect=False).size == (96, 96)
    assert part.load(max_size=(224, 100), keep_aspect=False).size == (192, 100)
    with pytest.raises(InvalidParameterError, match="max_size width must be a positive int"):
        part.load(max_size=(0, 5))


def test_fit_of_every_family(gen: Generator) -> None:
    fit, keep_aspect = image_fit(gen)
    assert fit is not None
    processor = gen.processor.image_processor
    if gen.family == "idefics":
        assert fit == (processor.image_size, processor.image_size)
        assert keep_aspect is False
    else:
        assert fit == (processor.size["longest_edge"],) * 2
        assert keep_aspect is True


def test_answers_unchanged_for_an_image_within_the_processor_size(gen: Generator) -> None:
    fit, _ = image_fit(gen)
    assert fit is not None
    # Exactly at the limit on one side, below it on the other.
    image = picture(fit[0], max(1, fit[1] * 2 // 3), seed=3)
    served = ask(gen, image, "Describe this image.")
    local = in_process(gen, image, "Describe this image.")
    choice = served["choices"][0]
    assert choice["message"]["content"] == local.text
    assert served["usage"]["prompt_tokens"] == local.usage.prompt_tokens
    assert served["usage"]["completion_tokens"] == local.usage.completion_tokens
    served_logprobs = [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]
    assert served_logprobs == [(t.text, t.logprob) for t in local.logprobs]


def test_a_larger_image_keeps_its_image_tokens(gen: Generator) -> None:
    fit, _ = image_fit(gen)
    assert fit is not None
    image = picture(fit[0] * 3 + 7, fit[1] * 2 + 5, seed=4)
    served = ask(gen, image, "What is it?")
    local = in_process(gen, image, "What is it?")
    # The processor resizes the original to the same size the server shrank it to.
    assert served["usage"]["prompt_tokens"] == local.usage.prompt_tokens
