"""Benchmark 9: continuous batching, mixed answer lengths, every family.

Mixed traffic on one Generator per family (the "small" random-weight
checkpoints, float32, CPU, greedy): of ``COUNT`` mixed image conversations
(the generator of benchmark 2), three quarters ask ``max_new_tokens=SHORT``
and one quarter ``LONG`` (request ``i`` is long when ``i % 4 == 3``).
Sides, run alternately in the same process (``_common.interleaved``):

* open: ``COUNT`` threads, released together by a barrier, each asking one
  request with ``gen.generate`` (a burst; ``max_batch_size=BATCH``);
* oracle: the length-aware schedule that knows every length in advance:
  one ``gen.generate_batch`` over the short requests, then one over the
  long ones (``batch_size=BATCH`` each), on the same Generator: short rows
  run only with short ones and long with long, so no row waits for a longer
  one and every batch but the last of each kind is full;
* closed: ``CALLERS`` threads, each asking its ``COUNT / CALLERS`` requests
  one after another (one long among each caller's four, at a different
  position per caller); the target is the short requests' median latency
  against a lone short call's;
* lone short: ``LONE`` short requests asked one after another on the idle
  Generator (each one's latency is a lone call's);
* streams: ``STREAMS`` long streams (``gen.stream``) start together; once
  all decode (``STREAMS`` rows running and ``ARRIVE_AFTER`` steps run), one
  short request arrives: its latency against a lone call's, and against
  the streams' total time.

Before timing, the token ids of every concurrent side are compared with
lone calls for a sample of the requests (the first ``SAMPLE``, whose long
ones are also streams). Decode steps are ``gen.stats().steps`` differences.

The default sizes are the issue's (64 requests, ``max_batch_size=16``, 8 and
128 new tokens, 16 callers, 8 streams), 2 interleaved rounds: 26 minutes for
the four families on the shared 2-core VM (IDEFICS 1 the slowest); every
round is kept and the foreign CPU share is reported. ``--quick`` (idefics3,
8 requests, batches of 4, 24 long tokens, 1 round) is a smoke run.

    .venv/bin/python benchmarks/bench_continuous.py [--quick] [--runs N] [--families f1,f2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
from bench_batching import make_contents

from idefics_kit import Generator, Result

FAMILIES = ("idefics", "idefics2", "idefics3", "smolvlm")
TARGET_OPEN = 1.4
TARGET_CLOSED = 4.0


@dataclass(frozen=True)
class Sizes:
    count: int
    callers: int
    batch: int
    short: int
    long: int
    streams: int
    lone: int
    sample: int
    arrive_after: int


FULL = Sizes(
    count=64, callers=16, batch=16, short=8, long=128, streams=8, lone=4, sample=8, arrive_after=16
)
QUICK = Sizes(
    count=8, callers=2, batch=4, short=8, long=24, streams=2, lone=2, sample=4, arrive_after=4
)


class Run:
    """Answers, per-request latencies and decode steps of one run of a side."""

    def __init__(self) -> None:
        self.results: dict[int, Result] = {}
        self.latency: dict[int, float] = {}
        self.steps = 0
        self.row_steps = 0
        self.admissions = 0
        self.admitted = 0
        self.lock = threading.Lock()

    def record(self, index: int, result: Result, started: float) -> None:
        with self.lock:
            self.results[index] = result
            self.latency[index] = time.perf_counter() - started


STAGES = ("prepare", "queue", "prefill", "decode")
"""A request's stages, from :class:`idefics_kit.Timing`."""


def stage_seconds(result: Result, stage: str) -> float:
    """Seconds ``result`` spent in ``stage`` (one of :data:`STAGES`, or ``"total"``)."""
    timing = result.timing
    assert timing is not None, "a successful result carries its timing"
    return {
        "prepare": timing.prepare_s,
        "queue": timing.queue_s,
        "prefill": timing.prefill_s,
        "decode": timing.decode_s,
        "total": timing.total_s,
    }[stage]


def is_long(index: int) -> bool:
    return index % 4 == 3


def measure(gen: Generator, family: str, sizes: Sizes, runs: int) -> dict[str, Any]:
    contents = make_contents(sizes.count, seed=9)
    convs = [_common.conversation(content) for content in contents]
    tokens = [sizes.long if is_long(i) else sizes.short for i in range(sizes.count)]
    shorts = [i for i in range(sizes.count) if not is_long(i)]
    longs = [i for i in range(sizes.count) if is_long(i)]
    per_caller = sizes.count // sizes.callers
    # Caller c asks indices c*k .. c*k+k-1 rotated by c: the long one sits at a
    # different position in each caller's chain.
    plans = [
        [c * per_caller + (k + c) % per_caller for k in range(per_caller)]
        for c in range(sizes.callers)
    ]
    stream_indices = longs[: sizes.streams]
    arriving = shorts[0]
    own: dict[str, Run] = {}
    extra: dict[str, list[float]] = {"streams_total_s": [], "short_during_streams_s": []}

    def counted(name: str, body: Callable[[Run], None]) -> Callable[[], Run]:
        def side() -> Run:
            gen.clear_vision_cache()
            run = Run()
            before = gen.stats()
            body(run)
            after = gen.stats()
            run.steps = after.steps - before.steps
            run.row_steps = after.row_steps - before.row_steps
            run.admissions = after.batches - before.batches
            run.admitted = after.rows - before.rows
            own[name] = run
            return run

        return side

    def open_loop(run: Run) -> None:
        barrier = threading.Barrier(sizes.count)

        def caller(index: int) -> None:
            barrier.wait()
            started = time.perf_counter()
            run.record(index, gen.generate(convs[index], max_new_tokens=tokens[index]), started)

        workers = [threading.Thread(target=caller, args=(i,)) for i in range(sizes.count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def oracle(run: Run) -> None:
        for group, new in ((shorts, sizes.short), (longs, sizes.long)):
            started = time.perf_counter()
            results = gen.generate_batch(
                [convs[i] for i in group], batch_size=sizes.batch, max_new_tokens=new
            )
            for index, result in zip(group, results, strict=True):
                run.record(index, result, started)

    def closed_loop(run: Run) -> None:
        def caller(plan: list[int]) -> None:
            for index in plan:
                started = time.perf_counter()
                result = gen.generate(convs[index], max_new_tokens=tokens[index])
                run.record(index, result, started)

        workers = [threading.Thread(target=caller, args=(plan,)) for plan in plans]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def lone_short(run: Run) -> None:
        for index in shorts[: sizes.lone]:
            started = time.perf_counter()
            run.record(index, gen.generate(convs[index], max_new_tokens=sizes.short), started)

    def streams(run: Run) -> None:
        started = time.perf_counter()
        before = gen.stats().steps
        handles = [gen.stream(convs[i], max_new_tokens=sizes.long) for i in stream_indices]

        def drain(index: int, handle: Any) -> None:
            for _piece in handle:
                pass
            run.record(index, handle.result, started)

        workers = [
            threading.Thread(target=drain, args=(i, h))
            for i, h in zip(stream_indices, handles, strict=True)
        ]
        for worker in workers:
            worker.start()
        # The short request arrives once every stream is decoding.
        while True:
            stats = gen.stats()
            if stats.running >= len(handles) and stats.steps - before >= sizes.arrive_after:
                break
            if all(not worker.is_alive() for worker in workers):
                raise AssertionError("the streams finished before the short request arrived")
            time.sleep(0.002)
        asked = time.perf_counter()
        run.record(arriving, gen.generate(convs[arriving], max_new_tokens=sizes.short), asked)
        for worker in workers:
            worker.join()
        extra["streams_total_s"].append(time.perf_counter() - started)
        extra["short_during_streams_s"].append(run.latency[arriving])

    sides = {
        "open": counted("open", open_loop),
        "oracle": counted("oracle", oracle),
        "closed": counted("closed", closed_loop),
        "lone_short": counted("lone_short", lone_short),
        "streams": counted("streams", streams),
    }

    # Correctness first (also a warm-up): lone calls for a sample, then every side once.
    sample = sorted(set(range(min(sizes.sample, sizes.count))) | {arriving})
    lone: dict[int, tuple[int, ...]] = {}
    for index in sample:
        lone[index] = gen.generate(convs[index], max_new_tokens=tokens[index]).token_ids
    differing: dict[str, int] = {}
    checked: dict[str, int] = {}
    for name, side in sides.items():
        got = side().results
        common = [i for i in sample if i in got]
        checked[name] = len(common)
        differing[name] = sum(got[i].token_ids != lone[i] for i in common)
    for values in extra.values():
        values.clear()
    generated = {
        "short_mean_tokens": round(
            statistics.mean(len(own["oracle"].results[i].token_ids) for i in shorts), 2
        ),
        "long_mean_tokens": round(
            statistics.mean(len(own["oracle"].results[i].token_ids) for i in longs), 2
        ),
    }

    steps: dict[str, list[int]] = {name: [] for name in sides}
    row_steps: dict[str, list[int]] = {name: [] for name in sides}
    short_latency: dict[str, list[float]] = {"open": [], "closed": [], "lone_short": []}
    long_latency: dict[str, list[float]] = {"open": [], "closed": []}
    # Where a short request's time went (Result.timing), per round: the median of each stage.
    stages: dict[str, dict[str, list[float]]] = {
        name: {stage: [] for stage in STAGES} for name in short_latency
    }
    admissions: dict[str, list[int]] = {name: [] for name in sides}
    admitted: dict[str, list[int]] = {name: [] for name in sides}

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            done = sides[name]()
            steps[name].append(done.steps)
            row_steps[name].append(done.row_steps)
            admissions[name].append(done.admissions)
            admitted[name].append(done.admitted)
            if name in short_latency:
                short_latency[name].append(
                    statistics.median(done.latency[i] for i in done.latency if not is_long(i))
                )
                for stage, values in stages[name].items():
                    values.append(
                        statistics.median(
                            stage_seconds(done.results[i], stage)
                            for i in done.results
                            if not is_long(i)
                        )
                    )
            if name in long_latency:
                long_latency[name].append(
                    statistics.median(done.latency[i] for i in done.latency if is_long(i))
                )

        return run

    # Every round is kept (max_foreign=1): this machine is shared, and a
    # rejected round would leave its latencies and steps behind in the lists
    # above; the ratios pair sides of the same round, and the foreign share
    # says how noisy the absolute times are.
    timings = _common.interleaved(
        {name: timed(name) for name in sides}, runs=runs, warmup=0, max_foreign=1.0
    )
    times = timings.seconds
    ratios = {
        "open_vs_oracle": _common.paired_ratio(times["open"], times["oracle"]),
        "closed_vs_oracle": _common.paired_ratio(times["closed"], times["oracle"]),
        "closed_short_p50_vs_lone": _common.paired_ratio(
            short_latency["closed"], short_latency["lone_short"]
        ),
        "open_short_p50_vs_lone": _common.paired_ratio(
            short_latency["open"], short_latency["lone_short"]
        ),
        "short_during_streams_vs_lone": _common.paired_ratio(
            extra["short_during_streams_s"], short_latency["lone_short"]
        ),
        "short_during_streams_vs_streams_total": _common.paired_ratio(
            extra["short_during_streams_s"], extra["streams_total_s"]
        ),
        "open_steps_vs_oracle": _common.paired_ratio(steps["open"], steps["oracle"]),
    }
    per_round = {
        "open_vs_oracle": [
            round(o / r, 3) for o, r in zip(times["open"], times["oracle"], strict=True)
        ],
        "closed_short_p50_vs_lone": [
            round(c / lone, 3)
            for c, lone in zip(short_latency["closed"], short_latency["lone_short"], strict=True)
        ],
        "short_during_streams_vs_lone": [
            round(s / lone, 3)
            for s, lone in zip(
                extra["short_during_streams_s"], short_latency["lone_short"], strict=True
            )
        ],
    }
    return {
        "family": family,
        "times": {name: _common.summary(seconds) for name, seconds in times.items()},
        "ratios": {name: round(value, 3) for name, value in ratios.items()},
        "per_round": per_round,
        "steps": dict(steps),
        "mean_rows_per_step": {
            name: round(sum(row_steps[name]) / max(1, sum(steps[name])), 2) for name in sides
        },
        "short_p50_s": {
            name: round(statistics.median(values), 4) for name, values in short_latency.items()
        },
        "long_p50_s": {
            name: round(statistics.median(values), 4) for name, values in long_latency.items()
        },
        "short_stages_p50_s": {
            name: {stage: round(statistics.median(v), 4) for stage, v in by_stage.items()}
            for name, by_stage in stages.items()
        },
        "rows_per_admission": {
            name: round(sum(admitted[name]) / max(1, sum(admissions[name])), 2) for name in sides
        },
        "short_during_streams_s": round(statistics.median(extra["short_during_streams_s"]), 4),
        "streams_total_s": round(statistics.median(extra["streams_total_s"]), 4),
        "generated": generated,
        "checked_requests": checked,
        "differing_outputs": differing,
        "foreign_cpu_share": timings.foreign_cpu_share,
        "rejected_noisy_rounds": timings.rejected_rounds,
    }


def bench(
    root: Path,
    family: str,
    sizes: Sizes,
    runs: int,
    prefill_tokens: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    path = _common.build_checkpoint(family, root)
    settings: dict[str, Any] = {"max_batch_size": sizes.batch}
    if prefill_tokens is not None:
        settings["max_prefill_tokens"] = prefill_tokens
    gen = Generator.from_pretrained(path, device=device, **settings)
    try:
        return measure(gen, family, sizes, runs)
    finally:
        gen.close()


def verdict(row: dict[str, Any]) -> str:
    """One family's targets, spread and checks, on one line."""
    open_ok = "met" if row["ratios"]["open_vs_oracle"] <= TARGET_OPEN else "MISSED"
    closed_ok = "met" if row["ratios"]["closed_short_p50_vs_lone"] <= TARGET_CLOSED else "MISSED"
    return (
        f"{row['family']}: open/oracle {row['ratios']['open_vs_oracle']:.2f} "
        f"(target <= {TARGET_OPEN}: {open_ok}; rounds {row['per_round']['open_vs_oracle']}), "
        f"closed short p50/lone {row['ratios']['closed_short_p50_vs_lone']:.2f} "
        f"(target <= {TARGET_CLOSED}: {closed_ok}; rounds "
        f"{row['per_round']['closed_short_p50_vs_lone']}), short in streams / streams "
        f"{row['ratios']['short_during_streams_vs_streams_total']:.3f}; "
        f"differing token ids {row['differing_outputs']} of {row['checked_requests']}; "
        f"mean tokens short {row['generated']['short_mean_tokens']} long "
        f"{row['generated']['long_mean_tokens']}; mean rows per step open "
        f"{row['mean_rows_per_step']['open']} oracle {row['mean_rows_per_step']['oracle']} "
        f"closed {row['mean_rows_per_step']['closed']}; short stages p50 s (prepare, queue, "
        f"prefill, decode) closed {_stages(row, 'closed')} lone {_stages(row, 'lone_short')}; "
        f"rows per admission closed {row['rows_per_admission']['closed']}; other processes "
        f"{row['foreign_cpu_share']:.0%} ({row['rejected_noisy_rounds']} rounds rerun)"
    )


def _stages(row: dict[str, Any], side: str) -> str:
    return "/".join(f"{row['short_stages_p50_s'][side][stage]:.3f}" for stage in STAGES)


def report(
    rows: list[dict[str, Any]],
    sizes: Sizes,
    runs: int,
    quick: bool,
    output: str = "continuous",
    device: str = "cpu",
) -> None:
    print(
        f"Continuous batching: {sizes.count} requests (3/4 max_new_tokens={sizes.short}, "
        f"1/4 {sizes.long}, greedy), max_batch_size={sizes.batch}, {sizes.callers} closed-loop "
        f"callers, {sizes.streams} long streams; small checkpoints, float32, {device}; "
        f"{runs} interleaved rounds"
    )
    print(
        _common.table(
            [
                "family",
                "open s",
                "oracle s",
                "open/oracle",
                "steps open/oracle",
                "closed s",
                "closed/oracle",
                "short p50 closed s",
                "lone short s",
                "closed/lone",
                "short in streams s",
                "/lone",
                "streams s",
            ],
            [
                [
                    row["family"],
                    f"{row['times']['open']['median_s']:.2f}",
                    f"{row['times']['oracle']['median_s']:.2f}",
                    f"{row['ratios']['open_vs_oracle']:.2f}",
                    f"{statistics.median(row['steps']['open']):.0f}/"
                    f"{statistics.median(row['steps']['oracle']):.0f}",
                    f"{row['times']['closed']['median_s']:.2f}",
                    f"{row['ratios']['closed_vs_oracle']:.2f}",
                    f"{row['short_p50_s']['closed']:.3f}",
                    f"{row['short_p50_s']['lone_short']:.3f}",
                    f"{row['ratios']['closed_short_p50_vs_lone']:.2f}",
                    f"{row['short_during_streams_s']:.3f}",
                    f"{row['ratios']['short_during_streams_vs_lone']:.2f}",
                    f"{row['streams_total_s']:.2f}",
                ]
                for row in rows
            ],
        )
    )
    print()
    for row in rows:
        print(verdict(row))
    name = f"{output}_quick" if quick else output
    path = _common.write_results(
        name,
        {
            "settings": {
                "checkpoint": f"build_tiny_checkpoint(size='small'), float32, {device}",
                **sizes.__dict__,
                "runs": runs,
            },
            "results": rows,
        },
    )
    print(f"\nwrote {path.relative_to(_common.ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: idefics3 only, 8 requests, batches of 4, long = 24 tokens, 1 round",
    )
    parser.add_argument("--runs", type=int, help="interleaved rounds of all sides (default 2)")
    parser.add_argument("--families", help="comma-separated subset of " + ",".join(FAMILIES))
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        help="the Generator's max_prefill_tokens (default: the SDK's, 4096)",
    )
    parser.add_argument("--output", default="continuous", help="results file name (no .json)")
    parser.add_argument(
        "--device", default="cpu", help="where the model runs (default cpu; cuda on a GPU machine)"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 2)
    families = (
        args.families.split(",") if args.families else (["idefics3"] if args.quick else FAMILIES)
    )
    _common.configure()
    rows = []
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        for family in families:
            started = time.perf_counter()
            rows.append(bench(Path(tmp), family, sizes, runs, args.max_prefill_tokens, args.device))
            print(f"({time.perf_counter() - started:.0f} s) {verdict(rows[-1])}", flush=True)
    report(rows, sizes, runs, args.quick, args.output, args.device)


if __name__ == "__main__":
    main()
