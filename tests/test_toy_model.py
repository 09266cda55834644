"""The packaged toy model, and the toy model as an oracle for image handling.

A random-weight model cannot tell a red circle from a blue square, so it
cannot catch a swapped channel order, a dropped alpha channel, an ignored EXIF
rotation or images fed in the wrong order. The toy model can: each test first
checks that the model gets a scene right from the plain PIL image, then that
every other way of passing the same picture gets the same right answer.
"""

from __future__ import annotations

import base64
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from idefics_kit import Conversation, Generator, ImagePart
from idefics_kit.toy import TOY_MODEL, checkpoint_path
from idefics_kit.toy.heldout import CATEGORIES, held_out, single_turn, two_turn
from idefics_kit.toy.scenes import (
    COLORS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    QuestionKind,
    Scene,
    draw_count_scene,
    draw_scene,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


@pytest.fixture(scope="module")
def toy() -> Generator:
    return Generator.from_pretrained(TOY_MODEL, device="cpu")


def ask(gen: Generator, image: ImagePart, kind: QuestionKind) -> str:
    return gen.generate(Conversation().user(image, QUESTIONS[kind]), max_new_tokens=12).text


def scenes(seed: int) -> list[Scene]:
    """One scene per colour, shape and position, in rotation."""
    rng = random.Random(seed)
    return [
        draw_scene(
            rng,
            color=COLORS[i % len(COLORS)],
            shape=SHAPES[i % len(SHAPES)],
            position=POSITIONS[i % len(POSITIONS)],
        )
        for i in range(12)
    ]


@pytest.fixture(scope="module")
def known(toy: Generator) -> list[Scene]:
    """Scenes whose colour, shape and position the toy model gets right from PIL images."""
    chosen = []
    for scene in scenes(seed=4242):
        image = ImagePart.from_pil(scene.image)
        if all(ask(toy, image, k) == scene.answer(k) for k in ("color", "shape", "position")):
            chosen.append(scene)
    # The model is right on far more than this; the tests need enough scenes to mean something.
    assert len(chosen) >= 9
    return chosen


def test_toy_loads_through_the_public_path_offline(toy: Generator) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert toy.family == "idefics3"
    folder = checkpoint_path()
    assert (folder / "model.safetensors").is_file()
    # Small enough to ship inside the wheel.
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10 * 2**20
    same = Generator.from_pretrained(folder, device="cpu")
    conversation = single_turn(scenes(seed=1)[0], "color")
    assert toy.prompt_token_ids(conversation) == same.prompt_token_ids(conversation)
    assert toy.generate(conversation).token_ids == same.generate(conversation).token_ids


EXAMPLE_ANSWERS = {
    "red_circle.png": ("red", "circle", "left", "a red circle on the left", "one"),
    "blue_square.png": ("blue", "square", "center", "a blue square in the center", "one"),
    "green_triangle.png": ("green", "triangle", "right", "a green triangle on the right", "one"),
}
KINDS: tuple[QuestionKind, ...] = ("color", "shape", "position", "describe", "count")


def test_example_images_get_right_answers(toy: Generator) -> None:
    # The pictures the README, the CLI help and the quickstart example use.
    for name, answers in EXAMPLE_ANSWERS.items():
        image = ImagePart.from_path(EXAMPLES / name)
        assert tuple(ask(toy, image, kind) for kind in KINDS) == answers, name
    assert ask(toy, ImagePart.from_path(EXAMPLES / "three_shapes.png"), "count") == "three"


def test_held_out_subset_meets_the_targets(toy: Generator) -> None:
    # A fast slice of tools/eval_toy_model.py (which asks 1,200 questions).
    questions = held_out(seed=99, per_category=15)
    results = toy.generate_batch([q.conversation for q in questions], max_new_tokens=12)
    right = dict.fromkeys(CATEGORIES, 0)
    for question, result in zip(questions, results, strict=True):
        right[question.category] += result.text == question.expected
    assert right["color"] >= 14
    assert right["position"] >= 14
    assert right["count"] >= 14
    assert right["second-turn"] >= 14
    assert right["shape"] >= 13
    assert right["describe"] >= 12


def encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda im: ImagePart.from_bytes(encoded(im, "PNG")), id="png"),
        pytest.param(lambda im: ImagePart.from_bytes(encoded(im, "JPEG", quality=90)), id="jpeg"),
        pytest.param(
            lambda im: ImagePart.from_bytes(
                encoded(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "GIF")
            ),
            id="palette-gif",
        ),
        pytest.param(lambda im: ImagePart.from_array(np.asarray(im)), id="numpy-rgb"),
        pytest.param(
            lambda im: ImagePart.from_base64(base64.b64encode(encoded(im, "PNG")).decode()),
            id="base64",
        ),
        pytest.param(
            lambda im: ImagePart.from_base64(
                "data:image/jpeg;base64," + base64.b64encode(encoded(im, "JPEG")).decode()
            ),
            id="data-uri",
        ),
    ],
)
def test_every_encoding_gives_the_right_answer(
    toy: Generator, known: list[Scene], make: Any
) -> None:
    for scene in known:
        image = make(scene.image)
        for kind in ("color", "shape", "position"):
            assert ask(toy, image, kind) == scene.answer(kind), (kind, scene.items)


def test_png_file_on_disk(toy: Generator, known: list[Scene], tmp_path: Path) -> None:
    for i, scene in enumerate(known):
        path = tmp_path / f"scene{i}.png"
        scene.image.save(path)
        assert ask(toy, ImagePart.from_path(path), "color") == scene.answer("color")


def test_transparent_areas_are_composited_on_white(toy: Generator, known: list[Scene]) -> None:
    for scene in known:
        item = scene.items[0]
        rgba = scene.image.convert("RGBA")
        pixels = np.array(rgba)
        # Transparent background whose hidden colour is black: dropping the
        # alpha channel instead of compositing shows the shape on black.
        x0, x1 = int(item.cx - item.size / 2), int(item.cx + item.size / 2)
        y0, y1 = int(item.cy - item.size / 2), int(item.cy + item.size / 2)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[max(0, y0 - 1) : y1 + 2, max(0, x0 - 1) : x1 + 2] = False
        pixels[outside] = (0, 0, 0, 0)
        image = ImagePart.from_bytes(encoded(Image.fromarray(pixels, "RGBA"), "PNG"))
        assert ask(toy, image, "color") == scene.answer("color")
        assert ask(toy, image, "position") == scene.answer("position")
        assert ask(toy, ImagePart.from_array(pixels), "position") == scene.answer("position")


def test_greyscale_keeps_the_position(toy: Generator, known: list[Scene]) -> None:
    for scene in known:
        grey = scene.image.convert("L")
        assert ask(toy, ImagePart.from_bytes(encoded(grey, "PNG")), "position") == scene.answer(
            "position"
        )
        assert ask(toy, ImagePart.from_array(np.asarray(grey)), "position") == scene.answer(
            "position"
        )


# EXIF orientation -> the transpose that turns the displayed picture into the stored one.
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_rotated_jpeg_is_judged_as_displayed(
    toy: Generator, known: list[Scene], orientation: int
) -> None:
    sided = [s for s in known if s.answer("position") != "center"]
    assert sided
    for scene in sided:
        stored = scene.image.transpose(STORED[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encoded(stored, "JPEG", quality=95, exif=exif.tobytes())
        assert ask(toy, ImagePart.from_bytes(data), "position") == scene.answer("position")
    if orientation == 3:
        # Read without the tag, the stored picture has the shape on the other side:
        # the test above could not pass by ignoring EXIF.
        flipped = ImagePart.from_pil(sided[0].image.transpose(Image.Transpose.ROTATE_180))
        assert ask(toy, flipped, "position") != sided[0].answer("position")


def test_second_turns_answer_about_their_own_image_single_and_batched(toy: Generator) -> None:
    rng = random.Random(5)
    conversations, expected = [], []
    for kind in ("color", "position", "count", "shape", "color", "count", "position", "color"):
        first = draw_scene(rng)
        second = draw_count_scene(rng) if kind == "count" else draw_scene(rng)
        # The right answer about the second image must differ from the first image's.
        while kind != "count" and second.answer(kind) == first.answer(kind):
            second = draw_scene(rng)
        while kind == "count" and second.answer("count") == "one":
            second = draw_count_scene(rng)
        conversations.append(two_turn(first, kind, second, kind))
        expected.append(second.answer(kind))
    singles = [toy.generate(c, max_new_tokens=12) for c in conversations]
    batched = toy.generate_batch(conversations, batch_size=8, max_new_tokens=12)
    assert [r.text for r in singles] == expected
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles]


def test_images_in_a_batch_stay_with_their_conversations(toy: Generator) -> None:
    rng = random.Random(11)
    batch = [draw_scene(rng, color=COLORS[i % 4], position=POSITIONS[i % 3]) for i in range(12)]
    results = toy.generate_batch(
        [single_turn(scene, "color") for scene in batch], batch_size=5, max_new_tokens=12
    )
    assert [r.text for r in results] == [scene.answer("color") for scene in batch]
