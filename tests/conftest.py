"""Shared fixtures: one tiny checkpoint per family, built once per session, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.utils import logging as transformers_logging

from idefics_kit import Generator
from idefics_kit.testing import build_tiny_checkpoint

transformers_logging.disable_progress_bar()

FAMILIES = ("idefics", "idefics2", "idefics3", "smolvlm")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def generators(checkpoints: dict[str, Path]) -> dict[str, Generator]:
    return {family: Generator.from_pretrained(path) for family, path in checkpoints.items()}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gen(family: str, generators: dict[str, Generator]) -> Generator:
    return generators[family]


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noisy RGB picture (random models need varied pixels)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
