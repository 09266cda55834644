"""The toy model's closed world: single-shape and counting scenes, drawn with Pillow.

The same drawer makes the training data (``tools/train_toy_model.py``), the
held-out evaluation (``tools/eval_toy_model.py``, other seeds) and the oracle
tests, so anyone can reproduce every number in docs/toy-model.md.

* Single-shape scenes: one ``circle``, ``square`` or ``triangle`` coloured
  ``red``, ``green``, ``blue`` or ``yellow``, its size 0.25 to 0.45 of the
  image's shorter side, on a light background of any tint, plain or noisy.
  Its position is the third of the width that holds its centre (centres keep
  5% of the width away from the boundaries between thirds).
* Counting scenes: one to three shapes of distinct kinds and colours, one per
  third of the width, each inside its third.
* Images are 64 to 512 px a side, aspect ratios up to 2:1 either way.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "COLORS",
    "COUNT_WORDS",
    "POSITIONS",
    "QUESTIONS",
    "SHAPES",
    "Color",
    "Item",
    "Position",
    "QuestionKind",
    "Scene",
    "Shape",
    "draw_count_scene",
    "draw_scene",
    "random_size",
]

Color = Literal["red", "green", "blue", "yellow"]
Shape = Literal["circle", "square", "triangle"]
Position = Literal["left", "center", "right"]
QuestionKind = Literal["color", "shape", "position", "describe", "count"]

COLORS: tuple[Color, ...] = get_args(Color)
SHAPES: tuple[Shape, ...] = get_args(Shape)
POSITIONS: tuple[Position, ...] = get_args(Position)
COUNT_WORDS = ("one", "two", "three")

QUESTIONS: dict[QuestionKind, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
    "describe": "Describe this image.",
    "count": "How many shapes are there?",
}

_PLACE = {"left": "on the left", "center": "in the center", "right": "on the right"}

# Channel ranges per colour name: wide enough that pure web colours
# ((255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 0)) fall inside.
_RGB_RANGES: dict[Color, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "red": ((170, 255), (0, 70), (0, 70)),
    "green": ((0, 80), (110, 230), (0, 100)),
    "blue": ((0, 70), (0, 120), (160, 255)),
    "yellow": ((210, 255), (190, 255), (0, 70)),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One drawn shape: what it is and where its bounding box sits (pixels)."""

    shape: Shape
    color: Color
    position: Position
    cx: float
    cy: float
    size: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Scene:
    """A drawn RGB picture and the shapes in it, left to right."""

    image: Image.Image
    items: tuple[Item, ...]

    def answer(self, kind: QuestionKind) -> str:
        """The one right answer to ``QUESTIONS[kind]`` about this scene."""
        if kind == "count":
            return COUNT_WORDS[len(self.items) - 1]
        if len(self.items) != 1:
            raise ValueError(f"a {kind!r} question needs a single-shape scene")
        item = self.items[0]
        if kind == "color":
            return item.color
        if kind == "shape":
            return item.shape
        if kind == "position":
            return item.position
        return f"a {item.color} {item.shape} {_PLACE[item.position]}"


ANSWERS: dict[QuestionKind, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "position": POSITIONS,
    "describe": tuple(f"a {c} {s} {_PLACE[p]}" for c in COLORS for s in SHAPES for p in POSITIONS),
    "count": COUNT_WORDS,
}


def random_size(rng: random.Random) -> tuple[int, int]:
    """A (width, height) with both sides in 64..512 and aspect ratio up to 2:1."""
    long_side = round(math.exp(rng.uniform(math.log(64), math.log(512))))
    ratio = rng.uniform(1.0, 2.0)
    short_side = max(64, round(long_side / ratio))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    tint = np.array([rng.randint(200, 255) for _ in range(3)], dtype=np.float32)
    pixels = np.broadcast_to(tint, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.5:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(
            0.0, rng.uniform(3.0, 15.0), size=(height, width, 1 if rng.random() < 0.5 else 3)
        )
        pixels = pixels + noise.astype(np.float32)
    return Image.fromarray(np.clip(pixels, 170, 255).astype(np.uint8), "RGB")


def _rgb(rng: random.Random, color: Color) -> tuple[int, int, int]:
    r, g, b = (rng.randint(low, high) for low, high in _RGB_RANGES[color])
    return (r, g, b)


def _draw(draw: ImageDraw.ImageDraw, item: Item, fill: tuple[int, int, int]) -> None:
    half = item.size / 2
    box = (item.cx - half, item.cy - half, item.cx + half, item.cy + half)
    if item.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif item.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(item.cx, box[1]), (box[0], box[3]), (box[2], box[3])],
            fill=fill,
        )


def draw_scene(
    rng: random.Random,
    *,
    color: Color | None = None,
    shape: Shape | None = None,
    position: Position | None = None,
    size: tuple[int, int] | None = None,
) -> Scene:
    """Draw a single-shape scene; unspecified attributes are drawn from ``rng``."""
    width, height = size or random_size(rng)
    item_color: Color = color if color is not None else rng.choice(COLORS)
    item_shape: Shape = shape if shape is not None else rng.choice(SHAPES)
    item_position: Position = position if position is not None else rng.choice(POSITIONS)
    side = rng.uniform(0.25, 0.45) * min(width, height)
    third = POSITIONS.index(item_position)
    # Inside the image, and 5% of the width clear of the boundaries between thirds.
    low = max(side / 2, (third / 3 + (0.05 if third else 0.0)) * width)
    high = min(width - side / 2, ((third + 1) / 3 - (0.05 if third < 2 else 0.0)) * width)
    item = Item(
        shape=item_shape,
        color=item_color,
        position=item_position,
        cx=rng.uniform(low, high),
        cy=rng.uniform(side / 2, height - side / 2),
        size=side,
    )
    image = _background(rng, width, height)
    _draw(ImageDraw.Draw(image), item, _rgb(rng, item_color))
    return Scene(image=image, items=(item,))


def draw_count_scene(
    rng: random.Random, *, count: int | None = None, size: tuple[int, int] | None = None
) -> Scene:
    """Draw one to three shapes of distinct kinds and colours, one per third of the width."""
    n = count or rng.randint(1, 3)
    if n not in (1, 2, 3):
        raise ValueError(f"count must be 1, 2 or 3; got {n!r}")
    width, height = size or random_size(rng)
    short = min(width, height)
    thirds = sorted(rng.sample(range(3), n))
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(COLORS, n)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    items = []
    for third, item_shape, item_color in zip(thirds, shapes, colors, strict=True):
        side = rng.uniform(0.25 * short, min(0.45 * short, 0.3 * width))
        low, high = third * width / 3 + side / 2, (third + 1) * width / 3 - side / 2
        item = Item(
            shape=item_shape,
            color=item_color,
            position=POSITIONS[third],
            cx=rng.uniform(low, high),
            cy=rng.uniform(side / 2, height - side / 2),
            size=side,
        )
        _draw(draw, item, _rgb(rng, item_color))
        items.append(item)
    return Scene(image=image, items=tuple(items))
