"""The scripts in examples/ run offline and print what the docs say they print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 180

# Lines (or parts of lines) each script must print.
MARKERS: dict[str, tuple[str, ...]] = {
    "quickstart_offline.py": (
        "generator: Generator(family='idefics3', device='cpu'",
        "red_circle.png | What color is the shape? -> red\n",
        "red_circle.png | What shape is it? -> circle\n",
        "blue_square.png | What color is the shape? -> blue\n",
        "blue_square.png | What shape is it? -> square\n",
        "green_triangle.png | What color is the shape? -> green\n",
        "green_triangle.png | What shape is it? -> triangle\n",
        "red_circle.png | Describe this image. -> a red circle on the left\n",
        "three_shapes.png | How many shapes are there? -> three\n",
        "finish_reason: stop",
        "usage: prompt_tokens=",
    ),
    "batch_and_stream.py": (
        "== idefics2: Generator(family='idefics2'",
        "== idefics3: Generator(family='idefics3'",
        "batch[0]: ",
        "batch[2]: ",
        "batch equals one-by-one: True",
        "stream pieces: ",
        "stream joins to generate's text: True",
    ),
    "multi_turn.py": (
        "turn 1 answer: ",
        "turn 2 answer: ",
        "turn 2 usage: Usage(prompt_tokens=",
        "prompt: '",
        '"type": "image"',
        "round trip equal: True",
    ),
}


# Scripts with a test of their own (they take longer than a marker check should).
CHECKED_ELSEWHERE = {"finetune_toy.py": "tests/test_finetune_toy.py"}


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({*MARKERS, *CHECKED_ELSEWHERE})


@pytest.mark.parametrize("script", sorted(MARKERS))
def test_example_runs_offline(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Run from an unrelated directory: the scripts must not depend on the cwd.
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    report = f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    for marker in MARKERS[script]:
        assert marker in proc.stdout, f"missing {marker!r}\n{report}"
    assert "Traceback" not in proc.stderr, report
