"""Ask questions about pictures, fully offline, with the built-in toy model.

``Generator.from_pretrained("toy")`` loads a tiny IDEFICS 3 model that ships
inside the package (a few MB, no download, no GPU). It only knows simple
pictures of one to three shapes (see docs/toy-model.md), but it answers them
correctly, through exactly the path a published checkpoint takes: chat
template, image processing, generation, stop tokens, usage counts. Replace
``"toy"`` with ``"HuggingFaceM4/Idefics3-8B-Llama3"`` (or any IDEFICS-family
checkpoint) to ask real questions about real photos.

Run it with ``python examples/quickstart_offline.py``.
"""

from __future__ import annotations

import os

# Set before transformers is imported: this script never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

from transformers.utils import logging as transformers_logging

from idefics_kit import Conversation, Generator, ImagePart

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    transformers_logging.disable_progress_bar()
    # device="cpu" keeps this tiny model off any GPU; real checkpoints use the default "auto".
    gen = Generator.from_pretrained("toy", device="cpu")
    print(f"generator: {gen!r}")

    for name in ("red_circle.png", "blue_square.png", "green_triangle.png"):
        image = ImagePart.from_path(IMAGES / name)
        for question in ("What color is the shape?", "What shape is it?", "Describe this image."):
            result = gen.generate(Conversation().user(image, question))
            print(f"{name} | {question} -> {result.text}")

    shapes = ImagePart.from_path(IMAGES / "three_shapes.png")
    last = gen.generate(Conversation().user(shapes, "How many shapes are there?"))
    print(f"three_shapes.png | How many shapes are there? -> {last.text}")
    usage = last.usage
    print(f"finish_reason: {last.finish_reason}")
    print(
        f"usage: prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} total_tokens={usage.total_tokens}"
    )


if __name__ == "__main__":
    main()
