"""Ask a question about an image, fully offline.

The checkpoint is a tiny random-weight IDEFICS 2 model that
``idefics_kit.testing.build_tiny_checkpoint`` writes to a temporary folder:
nothing is downloaded and the answer is noise. Everything around it is real:
the chat template, image processing, left padding, stop and banned tokens,
and the usage counts. Replace the checkpoint path with
``"HuggingFaceM4/idefics2-8b"`` to get a real answer.

Run it with ``python examples/quickstart_offline.py``.
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


def main() -> None:
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_checkpoint("idefics2", Path(tmp) / "tiny-idefics2")
        # device="cpu" keeps this tiny model off any GPU; real checkpoints use the default "auto".
        gen = Generator.from_pretrained(checkpoint, device="cpu")

        conversation = Conversation().user(
            ImagePart.from_path(IMAGES / "red_circle.png"),
            "What shape is in this image?",
        )
        result = gen.generate(conversation, max_new_tokens=24)

    usage = result.usage
    print(f"generator: {gen!r}")
    print(f"answer: {result.text!r}  (random weights, so this is noise)")
    print(f"finish_reason: {result.finish_reason}")
    print(
        f"usage: prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} total_tokens={usage.total_tokens}"
    )


if __name__ == "__main__":
    main()
