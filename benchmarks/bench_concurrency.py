"""Benchmark 5: concurrent callers sharing one Generator.

64 conversations (mixed prompts, 1-3 images of varied sizes, from the same
generator as benchmark 2) on the "small" IDEFICS 2 checkpoint, 24 new tokens,
greedy. Sides, run alternately in the same process:

* threads: 16 threads, each asking its 4 questions one after another with
  ``gen.generate`` (one shared Generator, ``max_batch_size=16``);
* asyncio: 16 tasks on one event loop, each awaiting its 4 ``gen.agenerate``;
* sequential: the same 64 requests made one after another on the Generator;
* ceiling: one ``gen.generate_batch`` call over the 64 (``batch_size=16``);
* raw singles: a loop of plain transformers calls (processor +
  ``model.generate``), one conversation each.

Throughput is requests per second of wall time; latency is from a request's
call to its answer. The target, the concurrent sides' share of the
ceiling's throughput, is measured in a second phase: each concurrent run
between two ceiling runs, against their mean (``_common.bracketed``). Token ids of the concurrent sides are compared with the
sequential ones (each a lone call) before timing. The vision cache is
cleared before every run (each conversation has its own pictures anyway).

    .venv/bin/python benchmarks/bench_concurrency.py [--quick] [--runs N] [--share-runs M]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
from bench_batching import make_contents

from idefics_kit import Conversation, Generator, Result

FAMILY = "idefics2"
CALLERS = 16
PER_CALLER = 4
COUNT = CALLERS * PER_CALLER
BATCH = 16
MAX_NEW_TOKENS = 24
TARGET_SHARE_OF_CEILING = 0.9
SIDES = ("threads", "asyncio", "sequential", "ceiling", "raw_singles")


class Run:
    """Answers and per-request latencies of one run of a side."""

    def __init__(self) -> None:
        self.results: dict[int, Result] = {}
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def record(self, index: int, result: Result, started: float) -> None:
        with self.lock:
            self.results[index] = result
            self.latencies.append(time.perf_counter() - started)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def bench(root: Path, runs: int, share_runs: int) -> dict[str, Any]:
    path = _common.build_checkpoint(FAMILY, root)
    gen = Generator.from_pretrained(path, device="cpu", max_batch_size=BATCH)
    contents = make_contents(COUNT, seed=5)
    return measure(gen, _common.Reference(gen, FAMILY), contents, runs, share_runs)


def measure(
    gen: Generator,
    reference: _common.Reference,
    contents: list[_common.Content],
    runs: int,
    share_runs: int,
) -> dict[str, Any]:
    """All sides on ``gen`` (its ``max_batch_size`` is the batch size), in the same process.

    Two phases: ``runs`` interleaved rounds of all five sides (times and the
    speed-ups over one-after-another calls), then ``share_runs`` runs of each
    concurrent side, each between two ceiling runs (the share of the
    ceiling, the target; see ``_common.bracketed``).
    """
    convs = [_common.conversation(content) for content in contents]
    own: dict[str, Run] = {}

    def caller_plan(caller: int) -> list[tuple[int, Conversation]]:
        return [(caller * PER_CALLER + k, convs[caller * PER_CALLER + k]) for k in range(4)]

    def threads() -> Run:
        gen.clear_vision_cache()
        run = Run()

        def caller(number: int) -> None:
            for index, conv in caller_plan(number):
                started = time.perf_counter()
                run.record(index, gen.generate(conv, max_new_tokens=MAX_NEW_TOKENS), started)

        workers = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        own["threads"] = run
        return run

    def in_asyncio() -> Run:
        gen.clear_vision_cache()
        run = Run()

        async def caller(number: int) -> None:
            for index, conv in caller_plan(number):
                started = time.perf_counter()
                result = await gen.agenerate(conv, max_new_tokens=MAX_NEW_TOKENS)
                run.record(index, result, started)

        async def everyone() -> None:
            await asyncio.gather(*(caller(n) for n in range(CALLERS)))

        asyncio.run(everyone())
        own["asyncio"] = run
        return run

    def sequential() -> Run:
        gen.clear_vision_cache()
        run = Run()
        for index, conv in enumerate(convs):
            started = time.perf_counter()
            run.record(index, gen.generate(conv, max_new_tokens=MAX_NEW_TOKENS), started)
        own["sequential"] = run
        return run

    def ceiling() -> Run:
        gen.clear_vision_cache()
        run = Run()
        started = time.perf_counter()
        results = gen.generate_batch(convs, batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)
        for index, result in enumerate(results):
            run.record(index, result, started)
        own["ceiling"] = run
        return run

    def raw_singles() -> list[list[int]]:
        return [reference.generate([content], MAX_NEW_TOKENS)[0] for content in contents]

    # Correctness first (also a warm-up round).
    lone = sequential().results
    raw = raw_singles()
    differing = {
        "sequential_vs_raw_singles": sum(list(lone[i].token_ids) != raw[i] for i in range(COUNT)),
    }
    for side, make in (("threads", threads), ("asyncio", in_asyncio), ("ceiling", ceiling)):
        got = make().results
        differing[f"{side}_vs_sequential"] = sum(
            got[i].token_ids != lone[i].token_ids for i in range(COUNT)
        )
    latencies: dict[str, list[float]] = {side: [] for side in SIDES}
    batches: dict[str, list[float]] = {side: [] for side in ("threads", "asyncio")}
    # Seconds the worker ran the model: wall time minus this is waiting
    # (for callers to prepare their next question, and handoffs).
    busy: dict[str, list[float]] = {side: [] for side in ("threads", "asyncio", "ceiling")}

    def timed(side: str, make: Any) -> Any:
        def run() -> None:
            before = gen.stats()
            make()
            after = gen.stats()
            if side in own:
                latencies[side].extend(own[side].latencies)
            if side in busy:
                busy[side].append(after.busy_seconds - before.busy_seconds)
            if side in batches:
                rows = after.rows - before.rows
                batches[side].append(rows / max(1, after.batches - before.batches))

        return run

    timings = _common.interleaved(
        {
            "threads": timed("threads", threads),
            "asyncio": timed("asyncio", in_asyncio),
            "sequential": timed("sequential", sequential),
            "ceiling": timed("ceiling", ceiling),
            "raw_singles": timed("raw_singles", raw_singles),
        },
        runs=runs,
        warmup=0,
    )
    busy_in_rounds = {side: list(values) for side, values in busy.items()}
    shares = _common.bracketed(
        ("ceiling", timed("ceiling", ceiling)),
        {"threads": timed("threads", threads), "asyncio": timed("asyncio", in_asyncio)},
        runs=share_runs,
    )
    times = timings.seconds
    stats = {side: _common.summary(seconds) for side, seconds in times.items()}
    rps = {side: round(COUNT / float(stats[side]["median_s"]), 3) for side in SIDES}
    paired = {
        f"{side}_vs_{base}": round(_common.paired_ratio(times[base], times[side]), 3)
        for side in ("threads", "asyncio", "ceiling")
        for base in ("sequential", "raw_singles")
    }
    for side in ("threads", "asyncio"):
        # Kept for comparison with earlier runs: the same share from the rounds.
        paired[f"{side}_share_of_ceiling_in_rounds"] = round(
            _common.paired_ratio(times["ceiling"], times[side]), 3
        )
    share_of_ceiling = {
        side: {
            "median": round(statistics.median(shares.shares[side]), 3),
            "of_minimums": round(min(shares.seconds["ceiling"]) / min(shares.seconds[side]), 3),
            "runs": [round(share, 3) for share in shares.shares[side]],
            "times": _common.summary(shares.seconds[side]),
        }
        for side in ("threads", "asyncio")
    }
    return {
        "family": reference.family,
        "requests": COUNT,
        "times": stats,
        "requests_per_s": rps,
        "paired_ratios": paired,
        "share_of_ceiling": share_of_ceiling,
        "share_ceiling_times": _common.summary(shares.seconds["ceiling"]),
        "share_model_busy_s": {
            side: round(statistics.median(values[len(busy_in_rounds[side]) :]), 3)
            for side, values in busy.items()
        },
        "share_foreign_cpu_share": shares.foreign_cpu_share,
        "share_rejected_runs": shares.rejected_runs,
        "latency_s": {
            side: {
                "p50": round(statistics.median(values), 4),
                "p95": round(percentile(values, 0.95), 4),
            }
            for side, values in latencies.items()
            if values
        },
        "model_busy_s": {
            side: round(statistics.median(values), 3)
            for side, values in busy_in_rounds.items()
            if values
        },
        "mean_batch_size": {
            side: round(statistics.mean(values), 2) for side, values in batches.items() if values
        },
        "differing_outputs": differing,
        "foreign_cpu_share": timings.foreign_cpu_share,
        "rejected_noisy_rounds": timings.rejected_rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds and 3 share runs instead of 5 and 10"
    )
    parser.add_argument("--runs", type=int, help="interleaved rounds of all sides")
    parser.add_argument(
        "--share-runs", type=int, help="runs of each concurrent side between ceiling runs"
    )
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    share_runs = args.share_runs or (3 if args.quick else 10)
    _common.configure()
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        row = bench(Path(tmp), runs, share_runs)
    report(
        row, runs, share_runs, "concurrency", "build_tiny_checkpoint(size='small'), float32, CPU"
    )


def report(row: dict[str, Any], runs: int, share_runs: int, name: str, checkpoint: str) -> None:
    """Print the tables and write benchmarks/results/<name>.json."""
    print(
        f"Concurrency: {CALLERS} callers x {PER_CALLER} requests ({row['family']}, {checkpoint}, "
        f"max_new_tokens={MAX_NEW_TOKENS}, max_batch_size={BATCH}), {runs} interleaved rounds, "
        f"{share_runs} bracketed share runs per concurrent side"
    )
    print(
        _common.table(
            [
                "side",
                "median s",
                "model busy s",
                "requests/s",
                "p50 latency s",
                "p95 latency s",
                "mean batch",
            ],
            [
                [
                    side,
                    f"{row['times'][side]['median_s']:.2f}",
                    row.get("model_busy_s", {}).get(side, "-"),
                    row["requests_per_s"][side],
                    row["latency_s"].get(side, {}).get("p50", "-"),
                    row["latency_s"].get(side, {}).get("p95", "-"),
                    row["mean_batch_size"].get(side, "-"),
                ]
                for side in SIDES
            ],
        )
    )
    print()
    for ratio, value in row["paired_ratios"].items():
        print(f"{ratio}: {value:.3f}")
    print(
        "\nShare of the ceiling's throughput, each run against the mean of the ceiling runs "
        "just before and after it:"
    )
    for side in ("threads", "asyncio"):
        share = row["share_of_ceiling"][side]
        verdict = "met" if share["median"] >= TARGET_SHARE_OF_CEILING else "MISSED"
        print(
            f"{side}: {share['median']:.1%} by the median (target 90%: {verdict}), "
            f"{share['of_minimums']:.1%} by the fastest runs; each run: "
            + " ".join(f"{value:.0%}" for value in share["runs"])
        )
    print(
        "  median seconds in these runs (model busy): "
        + ", ".join(
            f"{side} {times['median_s']:.2f} ({row['share_model_busy_s'][side]:.2f})"
            for side, times in (
                ("threads", row["share_of_ceiling"]["threads"]["times"]),
                ("asyncio", row["share_of_ceiling"]["asyncio"]["times"]),
                ("ceiling", row["share_ceiling_times"]),
            )
        )
    )
    print(f"differing token ids: {row['differing_outputs']}")
    print(
        f"other processes used {row['foreign_cpu_share']:.0%} of the CPUs "
        f"({row['rejected_noisy_rounds']} noisy rounds rerun); during the share runs "
        f"{row['share_foreign_cpu_share']:.0%} ({row['share_rejected_runs']} runs rerun)"
    )
    path = _common.write_results(
        name,
        {
            "settings": {
                "checkpoint": checkpoint,
                "callers": CALLERS,
                "requests_per_caller": PER_CALLER,
                "max_batch_size": BATCH,
                "max_new_tokens": MAX_NEW_TOKENS,
                "runs": runs,
                "share_runs": share_runs,
            },
            "result": row,
        },
    )
    print(f"\nwrote {path.relative_to(_common.ROOT)}")


if __name__ == "__main__":
    main()
