"""Teach the built-in toy model a new answer format with ``idefics-kit finetune``.

The toy model answers "What color is the shape?" with one word (``red``).
This script draws 300 training pictures, writes them as ``batch``-format JSONL
rows whose answers use a new format (``the shape is red``), fine-tunes with
the command's default settings (LoRA), and measures exact-match accuracy on
held-out pictures before and after. About a minute on 2 CPU cores.

    python examples/finetune_toy.py [WORK_FOLDER]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from idefics_kit import Conversation, Generator, ImagePart
from idefics_kit.cli import main as cli
from idefics_kit.toy.scenes import QUESTIONS, Scene, draw_scene

QUESTION = QUESTIONS["color"]


def new_answer(scene: Scene) -> str:
    """The answer format the toy model does not know yet."""
    return f"the shape is {scene.answer('color')}"


def write_rows(folder: Path, name: str, *, seed: int, count: int) -> Path:
    """``count`` training rows (pictures saved as PNG files) in ``folder/name.jsonl``."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        for index in range(count):
            scene = draw_scene(rng)
            picture = images / f"{name}-{index}.png"
            scene.image.save(picture)
            conversation = (
                Conversation()
                .user(ImagePart.from_path(picture), QUESTION)
                .assistant(new_answer(scene))
            )
            row = {"id": f"{name}-{index}", "messages": conversation.to_messages()}
            file.write(json.dumps(row) + "\n")
    return path


def held_out(*, seed: int, count: int) -> list[tuple[Conversation, str]]:
    """Fresh pictures (a seed neither training nor eval rows use) and their expected answers."""
    rng = random.Random(seed)
    questions = []
    for _ in range(count):
        scene = draw_scene(rng)
        questions.append(
            (Conversation().user(ImagePart.from_pil(scene.image), QUESTION), new_answer(scene))
        )
    return questions


def accuracy(model: str | Path, questions: list[tuple[Conversation, str]]) -> float:
    """Exact-match accuracy of ``model`` (greedy) on ``questions``."""
    with Generator.from_pretrained(model) as gen:
        results = gen.generate_batch([c for c, _ in questions], max_new_tokens=8)
    right = sum(
        r.text.strip() == expected for r, (_, expected) in zip(results, questions, strict=True)
    )
    return right / len(questions)


def run(work: Path, *extra_flags: str) -> tuple[float, float, float]:
    """Fine-tune into ``work/toy-tuned``; (accuracy before, after, training seconds)."""
    train = write_rows(work, "train", seed=11, count=300)
    evaluation = write_rows(work, "eval", seed=12, count=40)
    questions = held_out(seed=13, count=100)
    before = accuracy("toy", questions)
    out = work / "toy-tuned"
    started = time.perf_counter()
    code = cli(["finetune", str(train), "-o", str(out), "--eval", str(evaluation), *extra_flags])
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(code)
    return before, accuracy(out, questions), seconds


def main() -> None:
    if len(sys.argv) > 1:
        before, after, seconds = run(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            before, after, seconds = run(Path(folder))
    print(f"held-out exact match before: {before:.0%}")
    print(f"held-out exact match after: {after:.0%}")
    print(f"finetune took {seconds:.0f} s")


if __name__ == "__main__":
    main()
