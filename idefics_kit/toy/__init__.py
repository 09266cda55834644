"""The toy model: a tiny IDEFICS 3 checkpoint, trained here, shipped in the package.

``Generator.from_pretrained("toy")`` loads it through the same code path as
any checkpoint. It answers a closed set of questions about simple pictures
(one shape, or up to three for counting) drawn by :mod:`idefics_kit.toy.scenes`,
so a fresh machine without a GPU or a download can see the SDK give right
answers, and tests have an oracle that catches image-handling bugs. See
docs/toy-model.md for its world, its accuracy and how it was trained.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["TOY_MODEL", "checkpoint_path"]

TOY_MODEL = "toy"
"""The name ``Generator.from_pretrained`` and the CLI resolve to the packaged checkpoint."""


def checkpoint_path() -> Path:
    """The folder of the packaged toy checkpoint (config, weights, processor)."""
    # Wheels install as plain folders, so the resource is a real path; a
    # zipped install cannot hand transformers a folder and is refused.
    folder = files(__name__) / "checkpoint"
    if not isinstance(folder, Path):
        raise FileNotFoundError(
            "the toy checkpoint must be installed as files on disk, not inside a zip archive"
        )
    return folder
