"""The docs' toy example: the command's default settings teach the toy model a new answer format.

Runs examples/finetune_toy.py's steps (300 rows, ``idefics-kit finetune`` with
default flags) and holds the result to a real threshold on held-out pictures;
then the output folder is used with ``--model`` by ``ask`` and ``batch``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from idefics_kit.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "finetune_toy", ROOT / "examples" / "finetune_toy.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_toy_learns_a_new_answer_format_with_default_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after, _seconds = example().run(tmp_path, "--quiet")
    assert before <= 0.05  # it answers "red", not "the shape is red"
    assert after >= 0.9
    summary = capsys.readouterr().out
    assert "adapter in " in summary
    assert "eval exact match 0.0% -> " in summary

    out = tmp_path / "toy-tuned"
    image = ROOT / "examples" / "images" / "red_circle.png"
    assert (
        cli(
            [
                "ask",
                "--quiet",
                "--model",
                str(out),
                "--image",
                str(image),
                "What color is the shape?",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "the shape is red"

    question = {
        "id": "q1",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "path": str(ROOT / "examples" / "images" / "blue_square.png"),
                    },
                    {"type": "text", "text": "What color is the shape?"},
                ],
            }
        ],
    }
    (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
    answers = tmp_path / "a.jsonl"
    assert (
        cli(
            ["batch", "--quiet", "--model", str(out), str(tmp_path / "q.jsonl"), "-o", str(answers)]
        )
        == 0
    )
    assert json.loads(answers.read_text())["text"] == "the shape is blue"
