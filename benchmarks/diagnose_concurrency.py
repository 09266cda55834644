"""Why concurrent callers trailed the ceiling of benchmark 8: length sorting.

The ceiling (one ``generate_batch`` over all 64 conversations) sorts them by
prompt length before batching; concurrent callers arrive in any order. This
times the same 64 conversations (benchmark 8's, small IDEFICS 2, 24 new
tokens) as one sorted call against four calls of 16 in input order, the
batches arrival order gives, with the prefill in parts of similar length
(the SDK's default, ``idefics_kit.prefill``) and in one piece (as before it);
the sides alternate.

    .venv/bin/python benchmarks/diagnose_concurrency.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
from bench_batching import make_contents
from bench_concurrency import BATCH, COUNT, MAX_NEW_TOKENS

import idefics_kit.runner
from idefics_kit import Generator

IN_PARTS = idefics_kit.runner.prefill_parts


def one_piece(lengths: list[int]) -> list[list[int]]:
    return [list(range(len(lengths)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="timed rounds")
    args = parser.parse_args()
    _common.configure()
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        path = _common.build_checkpoint("idefics2", Path(tmp))
        gen = Generator.from_pretrained(path, device="cpu", max_batch_size=BATCH)
        convs = [_common.conversation(c) for c in make_contents(COUNT, seed=5)]

        def sorted_call() -> None:
            gen.clear_vision_cache()
            gen.generate_batch(convs, batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)

        def arrival_order() -> None:
            gen.clear_vision_cache()
            for start in range(0, COUNT, BATCH):
                gen.generate_batch(
                    convs[start : start + BATCH], batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS
                )

        def arrival_order_one_piece() -> None:
            idefics_kit.runner.prefill_parts = one_piece
            try:
                arrival_order()
            finally:
                idefics_kit.runner.prefill_parts = IN_PARTS

        sides = {
            "one sorted call": sorted_call,
            "batches in input order": arrival_order,
            "batches in input order, prefill in one piece": arrival_order_one_piece,
        }
        for side in sides.values():
            side()
        times: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.runs):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name in order:
                started = time.perf_counter()
                sides[name]()
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: {value:.2f} s (median of {args.runs})")
    sorted_s = medians["one sorted call"]
    for name in ("batches in input order", "batches in input order, prefill in one piece"):
        print(f"the sorted call is {medians[name] / sorted_s:.2f}x faster than {name}")
    gain = (
        medians["batches in input order, prefill in one piece"] / medians["batches in input order"]
    )
    print(f"prefill in parts: {gain:.2f}x on batches in input order")


if __name__ == "__main__":
    main()
