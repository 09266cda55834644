"""Batches and streaming, fully offline, with two model families.

For each of IDEFICS 2 and IDEFICS 3 a tiny random-weight checkpoint is built
in a temporary folder (nothing is downloaded, so the answers are noise). Then:

* ``generate_batch`` answers several conversations, left-padded, two at a
  time; results come back in input order, and with greedy decoding each one
  equals the answer the conversation gets on its own;
* ``stream`` yields an answer piece by piece; the pieces join to exactly the
  text that ``generate`` returns.

Run it with ``python examples/batch_and_stream.py``.
"""

from __future__ import annotations

import os

# Set before transformers is imported: this script never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile
from pathlib import Path

from transformers.utils import logging as transformers_logging

from idefics_kit import Conversation, Generator, ImagePart
from idefics_kit.testing import build_tiny_checkpoint

IMAGES = Path(__file__).resolve().parent / "images"


def conversations() -> list[Conversation]:
    """Three questions: two about different images, one without an image."""
    return [
        Conversation().user(ImagePart.from_path(IMAGES / "red_circle.png"), "What shape is this?"),
        Conversation().user("Describe a blue square in one sentence."),
        Conversation(system="Answer in one word.").user(
            "Which colour is the triangle?", ImagePart.from_path(IMAGES / "green_triangle.png")
        ),
    ]


def run(family: str, root: Path) -> None:
    gen = Generator.from_pretrained(build_tiny_checkpoint(family, root / family), device="cpu")
    print(f"== {family}: {gen!r}")

    batch = gen.generate_batch(conversations(), max_new_tokens=12, batch_size=2)
    for index, result in enumerate(batch):
        print(f"batch[{index}]: {result.text!r} ({result.finish_reason}, {result.usage})")

    singles = [gen.generate(conv, max_new_tokens=12) for conv in conversations()]
    same = [r.token_ids for r in batch] == [r.token_ids for r in singles]
    print(f"batch equals one-by-one: {same}")

    conversation = Conversation().user(
        ImagePart.from_path(IMAGES / "blue_square.png"), "What colour is the square?"
    )
    pieces = list(gen.stream(conversation, max_new_tokens=12))
    text = gen.generate(conversation, max_new_tokens=12).text
    print(f"stream pieces: {pieces!r}")
    print(f"stream joins to generate's text: {''.join(pieces) == text}")


def main() -> None:
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("idefics2", "idefics3"):
            run(family, Path(tmp))


if __name__ == "__main__":
    main()
