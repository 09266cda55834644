"""The toy model as the oracle for scoring and constrained choice.

A random-weight model gives every choice some score; only a trained model can
show that ``score`` and ``choice=`` pick the *right* answer. Held-out scenes
come from a seed the training never used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from idefics_kit import Conversation, Generator, ImagePart
from idefics_kit.toy import TOY_MODEL
from idefics_kit.toy.heldout import held_out
from idefics_kit.toy.scenes import COLORS, QUESTIONS, SHAPES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
TARGET = 0.99


@pytest.fixture(scope="module")
def toy() -> Iterator[Generator]:
    gen = Generator.from_pretrained(TOY_MODEL, device="cpu")
    yield gen
    gen.close()


@pytest.mark.parametrize(
    ("name", "color", "shape"),
    [
        ("red_circle.png", "red", "circle"),
        ("blue_square.png", "blue", "square"),
        ("green_triangle.png", "green", "triangle"),
    ],
)
def test_example_pictures(toy: Generator, name: str, color: str, shape: str) -> None:
    image = ImagePart.from_path(EXAMPLES / name)
    colors = toy.score(Conversation().user(image, QUESTIONS["color"]), list(COLORS))
    assert [s.choice for s in colors] == list(COLORS)
    assert max(colors, key=lambda s: s.logprob).choice == color
    shapes = Conversation().user(image, QUESTIONS["shape"])
    assert toy.generate(shapes, choice=["circle", "square", "triangle"]).text == shape


def test_200_held_out_colour_and_shape_questions() -> None:
    toy = Generator.from_pretrained(TOY_MODEL, device="cpu")
    try:
        questions = [q for q in held_out(4242, 100) if q.category in ("color", "shape")]
        assert len(questions) == 200
        by_category = {"color": list(COLORS), "shape": list(SHAPES)}
        scored = toy.score_batch(
            [q.conversation for q in questions], [by_category[q.category] for q in questions]
        )
        right = sum(
            max(scores, key=lambda s: s.logprob).choice == q.expected
            for scores, q in zip(scored, questions, strict=True)
        )
        assert right / len(questions) >= TARGET
        constrained = 0
        for category, choices in by_category.items():
            subset = [q for q in questions if q.category == category]
            answers = toy.generate_batch(
                [q.conversation for q in subset], choice=choices, max_new_tokens=4
            )
            assert all(a.text in choices and a.finish_reason == "stop" for a in answers)
            constrained += sum(a.text == q.expected for a, q in zip(answers, subset, strict=True))
        assert constrained / len(questions) >= TARGET
    finally:
        toy.close()
