"""Why concurrent callers trailed the ceiling of benchmark 8: length sorting.

The ceiling (one ``generate_batch`` over all 64 conversations) sorts them by
prompt length before batching; concurrent callers arrive in any order. This
times the same 64 conversations (benchmark 8's, small IDEFICS 2, 24 new
tokens) as one sorted call against four calls of 16 in input order, the
batches arrival order gives, with the prefill in parts of similar length
(the SDK's default, ``idefics_kit.engine``) and in one piece (as before it);
the sides alternate.

    .venv/bin/python benchmarks/diagnose_concurrency.py [--runs N] [--sweep]

``--sweep`` times the input-order batches under several part costs
(``idefics_kit.batching.PREFILL_PART_COST``), prefill only (1 new token) and
with 24 new tokens: what the default was chosen from.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
from bench_batching import make_contents
from bench_concurrency import BATCH, COUNT, MAX_NEW_TOKENS

import idefics_kit.batching
import idefics_kit.engine
from idefics_kit import Generator

IN_PARTS = idefics_kit.engine.prefill_parts


def one_piece(lengths: list[int]) -> list[list[int]]:
    return [list(range(len(lengths)))]


def medians(sides: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    """Median seconds of each side; the sides alternate, after one warm-up each."""
    for side in sides.values():
        side()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(runs):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for name in order:
            started = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="timed rounds")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead: batches in input order under several PREFILL_PART_COST values",
    )
    args = parser.parse_args()
    _common.configure()
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        path = _common.build_checkpoint("idefics2", Path(tmp))
        gen = Generator.from_pretrained(path, device="cpu", max_batch_size=BATCH)
        convs = [_common.conversation(c) for c in make_contents(COUNT, seed=5)]

        def sorted_call() -> None:
            gen.clear_vision_cache()
            gen.generate_batch(convs, batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)

        def arrival_order(new_tokens: int = MAX_NEW_TOKENS) -> None:
            gen.clear_vision_cache()
            for start in range(0, COUNT, BATCH):
                gen.generate_batch(
                    convs[start : start + BATCH], batch_size=BATCH, max_new_tokens=new_tokens
                )

        def under(cost: float | None, new_tokens: int = MAX_NEW_TOKENS) -> Callable[[], None]:
            """Input-order batches with the part cost ``cost`` (None: one piece)."""

            def run() -> None:
                default = idefics_kit.batching.PREFILL_PART_COST
                if cost is None:
                    idefics_kit.engine.prefill_parts = one_piece
                else:
                    idefics_kit.batching.PREFILL_PART_COST = cost
                try:
                    arrival_order(new_tokens)
                finally:
                    idefics_kit.engine.prefill_parts = IN_PARTS
                    idefics_kit.batching.PREFILL_PART_COST = default

            return run

        if args.sweep:
            costs: dict[str, float | None] = {
                "one piece": None,
                "1/8": 1 / 8,
                "1/16": 1 / 16,
                "1/32": 1 / 32,
                "0 (always 4 parts)": 0.0,
            }
            for new_tokens in (1, MAX_NEW_TOKENS):
                found = medians(
                    {name: under(cost, new_tokens) for name, cost in costs.items()}, args.runs
                )
                for name, value in found.items():
                    print(
                        f"max_new_tokens={new_tokens}, PREFILL_PART_COST {name}: "
                        f"{value:.2f} s (median of {args.runs})"
                    )
            return
        found = medians(
            {
                "one sorted call": sorted_call,
                "batches in input order": arrival_order,
                "batches in input order, prefill in one piece": under(None),
            },
            args.runs,
        )
    for name, value in found.items():
        print(f"{name}: {value:.2f} s (median of {args.runs})")
    sorted_s = found["one sorted call"]
    for name in ("batches in input order", "batches in input order, prefill in one piece"):
        print(f"the sorted call is {found[name] / sorted_s:.2f}x faster than {name}")
    gain = found["batches in input order, prefill in one piece"] / found["batches in input order"]
    print(f"prefill in parts: {gain:.2f}x on batches in input order")


if __name__ == "__main__":
    main()
