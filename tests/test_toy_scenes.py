"""The toy world's drawer keeps the promises docs/toy-model.md makes (no model needed)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from idefics_kit import Generator
from idefics_kit.testing import build_tiny_checkpoint
from idefics_kit.toy.heldout import CATEGORIES, held_out
from idefics_kit.toy.scenes import (
    ANSWERS,
    COLORS,
    POSITIONS,
    SHAPES,
    draw_count_scene,
    draw_scene,
    random_size,
)


def test_sizes_stay_in_range() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        width, height = random_size(rng)
        assert 64 <= width <= 512
        assert 64 <= height <= 512
        assert max(width, height) / min(width, height) <= 2.0 + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_single_shape_scenes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        scene = draw_scene(rng)
        width, height = scene.image.size
        assert scene.image.mode == "RGB"
        (item,) = scene.items
        assert 0.25 <= item.size / min(width, height) <= 0.45
        # Wholly inside the picture.
        assert item.size / 2 <= item.cx <= width - item.size / 2
        assert item.size / 2 <= item.cy <= height - item.size / 2
        third = POSITIONS.index(item.position)
        assert third * width / 3 <= item.cx <= (third + 1) * width / 3
        for boundary in (width / 3, 2 * width / 3):
            assert abs(item.cx - boundary) >= 0.05 * width - 1e-9
        # The centre pixel has the shape's colour, not the light background.
        r, g, b = scene.image.getpixel((int(item.cx), int(item.cy + item.size / 4)))
        assert min(r, g, b) < 120 or b < 80
        assert scene.answer("color") == item.color
        assert scene.answer("describe") in ANSWERS["describe"]


def test_count_scenes_put_distinct_shapes_in_distinct_thirds() -> None:
    rng = random.Random(1)
    seen = set()
    for _ in range(500):
        scene = draw_count_scene(rng)
        width, _ = scene.image.size
        n = len(scene.items)
        seen.add(n)
        assert scene.answer("count") == ("one", "two", "three")[n - 1]
        assert len({i.shape for i in scene.items}) == n
        assert len({i.color for i in scene.items}) == n
        assert len({i.position for i in scene.items}) == n
        for item in scene.items:
            third = POSITIONS.index(item.position)
            assert third * width / 3 - 1e-9 <= item.cx - item.size / 2
            assert item.cx + item.size / 2 <= (third + 1) * width / 3 + 1e-9
    assert seen == {1, 2, 3}


def test_fixed_attributes_and_errors() -> None:
    rng = random.Random(2)
    scene = draw_scene(rng, color="yellow", shape="triangle", position="right", size=(300, 150))
    assert scene.image.size == (300, 150)
    assert scene.answer("describe") == "a yellow triangle on the right"
    assert scene.answer("count") == "one"
    with pytest.raises(ValueError, match="count must be 1, 2 or 3; got 4"):
        draw_count_scene(rng, count=4)
    with pytest.raises(ValueError, match="needs a single-shape scene"):
        draw_count_scene(rng, count=2).answer("color")


def test_same_seed_same_pictures() -> None:
    a, b = draw_scene(random.Random(9)), draw_scene(random.Random(9))
    assert a.items == b.items
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_held_out_sets_cover_every_category_and_answer() -> None:
    questions = held_out(seed=3, per_category=60)
    assert [q.category for q in questions] == [c for c in CATEGORIES for _ in range(60)]
    by_category = {c: {q.expected for q in questions if q.category == c} for c in CATEGORIES}
    assert by_category["color"] == set(COLORS)
    assert by_category["shape"] == set(SHAPES)
    assert by_category["position"] == set(POSITIONS)
    assert by_category["count"] == {"one", "two", "three"}
    for q in questions:
        turns = q.conversation.turns
        assert len(turns) == (3 if q.category == "second-turn" else 1)
        assert q.expected == q.scene.answer(q.kind)


def test_a_local_folder_called_toy_needs_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_tiny_checkpoint("idefics2", tmp_path / "toy")
    monkeypatch.chdir(tmp_path)
    assert Generator.from_pretrained("./toy", device="cpu").family == "idefics2"
    assert Generator.from_pretrained("toy", device="cpu").family == "idefics3"
