"""Benchmark 3: eight questions about one image, with and without the vision cache.

Usage: .venv/bin/python benchmarks/bench_vision_cache.py [--quick]

For each family (small random-weight checkpoints) the same eight conversations
run as eight `generate` calls and as one `generate_batch`, on a Generator with
the cache (cleared before every run, so each run pays for one encoding) and
on one without it. Token ids must be identical. A forward hook on the vision
encoder measures how much of each run it takes: that share is what the cache
can save.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    build_checkpoint,
    configure,
    interleaved,
    paired_ratio,
    picture,
    summary,
    write_results,
)

from idefics_kit import Conversation, Generator

QUESTIONS = [
    "What is in this image?",
    "What colour is the shape?",
    "Describe the picture in detail.",
    "Is there a dog in it?",
    "Where is the shape?",
    "How many objects are there?",
    "Read the text in the image.",
    "Tell me a story about this picture.",
]


class EncoderClock:
    """Seconds spent inside the vision encoder's forward, via hooks."""

    def __init__(self, gen: Generator) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        vision = gen.model.base_model.vision_model
        vision.register_forward_pre_hook(self._enter)
        vision.register_forward_hook(self._leave)

    def _enter(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def _leave(self, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


def measure(family: str, root: Path, runs: int, max_new_tokens: int) -> dict[str, Any]:
    path = build_checkpoint(family, root)
    cached = Generator.from_pretrained(path)
    plain = Generator.from_model(cached.model, cached.processor, vision_cache_mb=0)
    image = picture(128, 96, seed=3)
    convs = [Conversation().user(image, question) for question in QUESTIONS]
    expected = [r.token_ids for r in plain.generate_batch(convs, max_new_tokens=max_new_tokens)]
    assert [
        r.token_ids for r in cached.generate_batch(convs, max_new_tokens=max_new_tokens)
    ] == expected
    clock = EncoderClock(cached)  # the model is shared: it times both sides

    def loop(gen: Generator) -> Callable[[], None]:
        def run() -> None:
            gen.clear_vision_cache()
            assert [
                gen.generate(c, max_new_tokens=max_new_tokens).token_ids for c in convs
            ] == expected

        return run

    def batch(gen: Generator) -> Callable[[], None]:
        def run() -> None:
            gen.clear_vision_cache()
            results = gen.generate_batch(convs, max_new_tokens=max_new_tokens, batch_size=8)
            assert [r.token_ids for r in results] == expected

        return run

    report: dict[str, Any] = {
        "family": family,
        "prompt_tokens": cached.generate(convs[0], max_new_tokens=1).usage.prompt_tokens,
    }
    for mode, make in (("8 x generate", loop), ("generate_batch(8)", batch)):
        clock.seconds, clock.calls = 0.0, 0
        before = time.perf_counter()
        make(plain)()
        total = time.perf_counter() - before
        share = clock.seconds / total
        encoder_calls_without = clock.calls
        clock.seconds, clock.calls = 0.0, 0
        make(cached)()
        encoder_calls_with = clock.calls
        timings = interleaved({"cache": make(cached), "no_cache": make(plain)}, runs=runs)
        report[mode] = {
            "cache": summary(timings.seconds["cache"]),
            "no_cache": summary(timings.seconds["no_cache"]),
            "speedup": round(
                paired_ratio(timings.seconds["no_cache"], timings.seconds["cache"]), 3
            ),
            "encoder_share_without_cache": round(share, 3),
            "encoder_calls_without_cache": encoder_calls_without,
            "encoder_calls_with_cache": encoder_calls_with,
            "foreign_cpu_share": timings.foreign_cpu_share,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and families")
    parser.add_argument("--families", nargs="*", default=None)
    args = parser.parse_args()
    configure()
    families = args.families or (
        ["idefics2", "idefics3"] if args.quick else ["idefics", "idefics2", "idefics3", "smolvlm"]
    )
    runs = 5 if args.quick else 10
    reports = []
    with tempfile.TemporaryDirectory() as root:
        for family in families:
            reports.append(measure(family, Path(root), runs, max_new_tokens=8))
    print(
        f"{'family':9} {'mode':18} {'no cache s':>10} {'cache s':>8} {'speedup':>8} {'encoder share':>13} {'encoder calls':>14}"
    )
    for report in reports:
        for mode in ("8 x generate", "generate_batch(8)"):
            row = report[mode]
            calls = f"{row['encoder_calls_without_cache']} -> {row['encoder_calls_with_cache']}"
            print(
                f"{report['family']:9} {mode:18} {row['no_cache']['median_s']:10.3f} "
                f"{row['cache']['median_s']:8.3f} {row['speedup']:7.2f}x "
                f"{row['encoder_share_without_cache']:12.0%} {calls:>14}"
            )
    write_results(
        "vision_cache",
        {
            "settings": {
                "runs": runs,
                "max_new_tokens": 8,
                "image": "128x96",
                "questions": len(QUESTIONS),
            },
            "families": reports,
        },
    )


if __name__ == "__main__":
    main()
