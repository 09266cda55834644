"""Question sets for measuring the toy model through the public API.

``held_out(seed, per_category)`` draws fresh scenes (use seeds the training
script never used: it uses 1234 to 1237) and asks each category's question;
``tools/eval_toy_model.py`` and the oracle tests both build on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, get_args

from idefics_kit.conversation import Conversation
from idefics_kit.images import ImagePart
from idefics_kit.toy.scenes import QUESTIONS, QuestionKind, Scene, draw_count_scene, draw_scene

__all__ = ["CATEGORIES", "Category", "ToyQuestion", "held_out", "single_turn", "two_turn"]

Category = Literal["color", "shape", "position", "describe", "count", "second-turn"]
CATEGORIES: tuple[Category, ...] = get_args(Category)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToyQuestion:
    """A conversation for the toy model and the one right answer to its last turn."""

    category: Category
    kind: QuestionKind
    """The kind of the last question (for ``second-turn``, drawn at random)."""
    conversation: Conversation
    expected: str
    scene: Scene
    """The picture the last question is about."""


def _scene(rng: random.Random, kind: QuestionKind) -> Scene:
    return draw_count_scene(rng) if kind == "count" else draw_scene(rng)


def single_turn(scene: Scene, kind: QuestionKind) -> Conversation:
    """One user turn asking ``QUESTIONS[kind]`` about ``scene``."""
    return Conversation().user(ImagePart.from_pil(scene.image), QUESTIONS[kind])


def two_turn(
    first: Scene, first_kind: QuestionKind, second: Scene, kind: QuestionKind
) -> Conversation:
    """A first turn answered correctly, then a question about the second picture."""
    return (
        single_turn(first, first_kind)
        .assistant(first.answer(first_kind))
        .user(ImagePart.from_pil(second.image), QUESTIONS[kind])
    )


def held_out(seed: int, per_category: int) -> list[ToyQuestion]:
    """``per_category`` questions of each category, category by category.

    ``second-turn`` questions are two-turn conversations, each turn with its
    own picture; the first answer is the right one, and the expected answer
    is about the second picture.
    """
    rng = random.Random(seed)
    kinds: tuple[QuestionKind, ...] = get_args(QuestionKind)
    questions = []
    for category in CATEGORIES:
        for _ in range(per_category):
            if category == "second-turn":
                first_kind, kind = rng.choice(kinds), rng.choice(kinds)
                first, scene = _scene(rng, first_kind), _scene(rng, kind)
                conversation = two_turn(first, first_kind, scene, kind)
            else:
                kind = category
                scene = _scene(rng, kind)
                conversation = single_turn(scene, kind)
            questions.append(
                ToyQuestion(
                    category=category,
                    kind=kind,
                    conversation=conversation,
                    expected=scene.answer(kind),
                    scene=scene,
                )
            )
    return questions
