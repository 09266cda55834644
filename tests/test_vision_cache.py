"""The vision cache: same answers with and without it, the encoder runs once per image."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from idefics_kit import Conversation, Generator, ImagePart, InvalidParameterError
from idefics_kit.vision_cache import VisionCache
from tests.conftest import picture

IMG = picture(40, 30, seed=11)
OTHER = picture(24, 56, seed=12)
QUESTIONS = [
    "What is in this image?",
    "What colour is it?",
    "Describe it in detail.",
    "Is there a dog?",
    "Where is the shape?",
    "How many objects?",
    "Read the text.",
    "Tell me a story about it.",
]


def uncached(gen: Generator) -> Generator:
    return Generator.from_model(gen.model, gen.processor, vision_cache_mb=0)


def encoder_calls(gen: Generator) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    vision = gen.model.base_model.vision_model
    handle = vision.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_same_token_ids_with_and_without_cache(gen: Generator) -> None:
    cached = Generator.from_model(gen.model, gen.processor)
    plain = uncached(gen)
    convs = [
        Conversation().user(IMG, "What is in this image?"),
        Conversation().user("Compare", IMG, "and", OTHER),
        Conversation().user("No picture here."),
        Conversation().user(IMG, "Describe.").assistant("A thing.").user(OTHER, "And this?"),
    ]
    expected = [plain.generate(c, max_new_tokens=10) for c in convs]
    assert [cached.generate(c, max_new_tokens=10) for c in convs] == expected
    assert cached.generate_batch(convs, max_new_tokens=10, batch_size=4) == expected
    assert plain.generate_batch(convs, max_new_tokens=10, batch_size=4) == expected
    assert "".join(cached.stream(convs[1], max_new_tokens=10)) == expected[1].text
    stats = cached.vision_cache
    assert stats is not None
    assert stats.misses == 2  # IMG and OTHER, each encoded once
    assert stats.hits > 0
    assert plain.vision_cache is None


def test_eight_questions_about_one_image_encode_it_once(gen: Generator) -> None:
    cached = Generator.from_model(gen.model, gen.processor)
    convs = [Conversation().user(IMG, q) for q in QUESTIONS]
    calls, handle = encoder_calls(cached)
    try:
        cached.generate_batch(convs, max_new_tokens=4, batch_size=3)
        assert len(calls) == 1
        calls.clear()
        uncached(gen).generate_batch(convs, max_new_tokens=4, batch_size=3)
        assert len(calls) == 3  # once per micro-batch without the cache
    finally:
        handle.remove()


def test_same_picture_from_any_source_is_one_entry(gen: Generator, tmp_path: Path) -> None:
    cached = Generator.from_model(gen.model, gen.processor)
    path = tmp_path / "img.png"
    IMG.save(path)
    buffer = io.BytesIO()
    IMG.save(buffer, format="PNG")
    sources = [
        ImagePart.from_path(path),
        ImagePart.from_bytes(buffer.getvalue()),
        ImagePart.from_pil(IMG),
    ]
    results = [cached.generate(Conversation().user(s, "What?"), max_new_tokens=4) for s in sources]
    assert results[0] == results[1] == results[2]
    stats = cached.vision_cache
    assert stats is not None
    assert (stats.misses, stats.hits, stats.entries) == (1, 2, 1)
    cached.clear_vision_cache()
    assert cached.vision_cache is not None
    assert cached.vision_cache.entries == 0


def test_lru_is_bounded() -> None:
    cache = VisionCache(max_mb=1)  # 1 MiB: four 256 KiB entries
    for key in "abcde":
        cache.get_or_compute(key, lambda: torch.zeros(64 * 1024))
    stats = cache.stats()
    assert stats.entries == 4
    assert stats.megabytes == 1.0
    cache.get_or_compute("b", lambda: torch.ones(1))  # a hit: "b" becomes the newest
    cache.get_or_compute("f", lambda: torch.zeros(64 * 1024))  # evicts "c", the oldest
    assert cache.get_or_compute("b", lambda: torch.ones(1)).shape == (64 * 1024,)
    assert cache.get_or_compute("c", lambda: torch.ones(1)).shape == (1,)
    huge = cache.get_or_compute("g", lambda: torch.zeros(2**20))  # larger than the cache
    assert huge.shape == (2**20,)
    assert cache.stats().megabytes <= 1.0


@pytest.mark.parametrize("value", [-1, "big", True])
def test_bad_size_is_rejected(value: object) -> None:
    with pytest.raises(InvalidParameterError, match="vision_cache_mb must be a number >= 0, got"):
        VisionCache(value)  # type: ignore[arg-type]
