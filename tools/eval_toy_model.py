"""Measure the toy model's accuracy through the public ``Generator`` API.

    python tools/eval_toy_model.py                       # the packaged model, 1,200 questions
    python tools/eval_toy_model.py --model /tmp/toy-run  # a fresh training run

Draws a held-out set with seeds the training never used, asks every question
through ``Generator.generate_batch`` (greedy), and prints one row per
category with its target. Exit status 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers.utils import logging as transformers_logging

from idefics_kit import Generator
from idefics_kit.toy.heldout import CATEGORIES, held_out

TARGETS = {
    "color": 0.97,
    "shape": 0.90,
    "position": 0.97,
    "describe": None,
    "count": 0.97,
    "second-turn": 0.95,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--per-category", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the table and every miss here")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and activations (bfloat16 is what CUDA gets by default)",
    )
    parser.add_argument(
        "--image-backend",
        choices=("auto", "pil", "torchvision"),
        default="auto",
        help="the image processor's backend; 'pil' is what installs without torchvision get",
    )
    args = parser.parse_args(argv)

    transformers_logging.disable_progress_bar()
    if args.image_backend == "auto":
        gen = Generator.from_pretrained(args.model, device="cpu", dtype=args.dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from idefics_kit.toy import TOY_MODEL, checkpoint_path

        folder = checkpoint_path() if args.model == TOY_MODEL else args.model
        gen = Generator.from_model(
            AutoModelForImageTextToText.from_pretrained(folder, dtype=args.dtype),
            AutoProcessor.from_pretrained(folder, backend=args.image_backend),
        )
    print(f"image processor: {type(gen.processor.image_processor).__name__}")
    questions = held_out(args.seed, args.per_category)
    start = time.perf_counter()
    results = gen.generate_batch(
        [q.conversation for q in questions], batch_size=args.batch_size, max_new_tokens=12
    )
    seconds = time.perf_counter() - start
    right: Counter[str] = Counter()
    misses = []
    for question, result in zip(questions, results, strict=True):
        if result.text.strip() == question.expected:
            right[question.category] += 1
        else:
            misses.append(
                {
                    "category": question.category,
                    "kind": question.kind,
                    "expected": question.expected,
                    "got": result.text,
                    "image_size": question.scene.image.size,
                    "shapes": [
                        {
                            "shape": i.shape,
                            "color": i.color,
                            "position": i.position,
                            "size_of_shorter_side": round(
                                i.size / min(question.scene.image.size), 3
                            ),
                        }
                        for i in question.scene.items
                    ],
                }
            )
    print(f"model {args.model}, seed {args.seed}, {len(questions)} questions, {seconds:.1f} s")
    print("| category | questions | correct | accuracy | target |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    missed_target = False
    for category in CATEGORIES:
        accuracy = right[category] / args.per_category
        target = TARGETS[category]
        ok = target is None or accuracy >= target
        missed_target |= not ok
        shown = "-" if target is None else f">= {target:.0%}" + ("" if ok else " MISSED")
        print(
            f"| {category} | {args.per_category} | {right[category]} | {accuracy:.1%} | {shown} |"
        )
        rows.append({"category": category, "correct": right[category], "accuracy": accuracy})
    wrong_by_kind = Counter(m["kind"] for m in misses)
    print(f"misses by question kind: {dict(wrong_by_kind)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"model": args.model, "seed": args.seed, "rows": rows, "misses": misses}, indent=2
            )
            + "\n"
        )
    return 1 if missed_target else 0


if __name__ == "__main__":
    sys.exit(main())
