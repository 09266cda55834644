"""A two-turn conversation and its chat-message (JSON) round trip, fully offline.

A tiny random-weight IDEFICS 2 checkpoint is built in a temporary folder
(nothing is downloaded, so the answers are noise). The example shows that
conversations are immutable values: each ``.user(...)``/``.assistant(...)``
returns a new one. It prints the prompt the model reads, then saves the
conversation as JSON with ``to_messages`` and loads it back with
``from_messages``.

Run it with ``python examples/multi_turn.py``.
"""

from __future__ import annotations

import os

# Set before transformers is imported: this script never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import tempfile
from pathlib import Path

from transformers.utils import logging as transformers_logging

from idefics_kit import Conversation, Generator, ImagePart
from idefics_kit.testing import build_tiny_checkpoint

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_checkpoint("idefics2", Path(tmp) / "tiny-idefics2")
        gen = Generator.from_pretrained(checkpoint, device="cpu")

        base = Conversation(system="You describe simple pictures.")
        first = base.user(ImagePart.from_path(IMAGES / "blue_square.png"), "What is this?")
        answer = gen.generate(first, max_new_tokens=12)
        print(f"turn 1 answer: {answer.text!r}")

        # Feed the answer back as an assistant turn, then ask a follow-up.
        # (A turn needs at least one non-empty part, hence the fallback.)
        second = first.assistant(answer.text or "(no answer)").user(
            "And this one?", ImagePart.from_path(IMAGES / "green_triangle.png")
        )
        reply = gen.generate(second, max_new_tokens=12)
        print(f"turn 2 answer: {reply.text!r}")
        print(f"turn 2 usage: {reply.usage}")
        print(f"base is unchanged: {len(base.turns)} turns; second has {len(second.turns)}")

        # The prompt as the model reads it (runs of <image> tokens shortened).
        prompt = gen.processor.tokenizer.decode(list(gen.prompt_token_ids(second)))
        prompt = re.sub(r"(?:<image>)+", lambda m: f"<image>x{len(m[0]) // 7}", prompt)
        print(f"prompt: {prompt!r}")

    # Chat messages are plain JSON: paths stay paths (relative ones resolve
    # against the working directory when the image is loaded).
    saved = json.dumps(second.to_messages(), indent=2)
    print(f"messages JSON:\n{saved}")
    restored = Conversation.from_messages(json.loads(saved))
    print(f"round trip equal: {restored == second}")


if __name__ == "__main__":
    main()
