"""Where a short request's time goes in benchmark 9's closed loop (a diagnosis, not a target).

16 callers on one Generator, each asking its 4 requests one after another
(3 ask 8 new tokens, 1 asks 128: benchmark 9's closed loop), against lone
short calls on the idle Generator. Each answered request's
``Result.timing`` splits its latency into stages (prepare, queue, prefill,
decode); this prints the median of each for the short requests, the rows
per admission round, and the same for variants:

* ``--stagger S``: each caller starts after a random delay in [0, S] s
  instead of all at the same instant, so short requests stop arriving in
  clumps (real callers do not start in step);
* ``--max-prefill-tokens N``: the Generator's per-step prefill budget.

    .venv/bin/python benchmarks/diagnose_continuous.py --family idefics2 --rounds 2
    .venv/bin/python benchmarks/diagnose_continuous.py --family idefics2 --stagger 0.5
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
from bench_batching import make_contents
from bench_continuous import FULL, is_long, stage_seconds
from bench_continuous import STAGES as BENCH_STAGES

from idefics_kit import Generator, Result

COUNT, CALLERS, SHORT, LONG, LONE = FULL.count, FULL.callers, FULL.short, FULL.long, FULL.lone
STAGES = (*BENCH_STAGES, "total")


def medians(results: list[Result]) -> dict[str, float]:
    return {
        name: round(statistics.median(stage_seconds(r, name) for r in results), 4)
        for name in STAGES
    }


def closed_loop(gen: Generator, convs: list[Any], stagger: float, seed: int) -> dict[str, Any]:
    tokens = [LONG if is_long(i) else SHORT for i in range(COUNT)]
    per = COUNT // CALLERS
    plans = [[c * per + (k + c) % per for k in range(per)] for c in range(CALLERS)]
    delays = [random.Random(seed + c).uniform(0, stagger) for c in range(CALLERS)]
    results: dict[int, Result] = {}
    lock = threading.Lock()

    def caller(plan: list[int], delay: float) -> None:
        time.sleep(delay)
        for index in plan:
            result = gen.generate(convs[index], max_new_tokens=tokens[index])
            with lock:
                results[index] = result

    gen.clear_vision_cache()
    before = gen.stats()
    started = time.perf_counter()
    workers = [
        threading.Thread(target=caller, args=(plan, delay))
        for plan, delay in zip(plans, delays, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    after = gen.stats()
    steps = after.steps - before.steps
    return {
        "wall_s": round(wall, 3),
        "steps": steps,
        "rows_per_step": round((after.row_steps - before.row_steps) / max(1, steps), 2),
        "rows_per_admission": round(
            (after.rows - before.rows) / max(1, after.batches - before.batches), 2
        ),
        "seconds_per_iteration": round((after.busy_seconds - before.busy_seconds) / steps, 4),
        "short": medians([r for i, r in results.items() if not is_long(i)]),
    }


def lone_short(gen: Generator, convs: list[Any]) -> dict[str, float]:
    gen.clear_vision_cache()
    shorts = [i for i in range(COUNT) if not is_long(i)][:LONE]
    return medians([gen.generate(convs[i], max_new_tokens=SHORT) for i in shorts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="idefics2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds (default 0)")
    parser.add_argument("--max-prefill-tokens", type=int)
    parser.add_argument("--device", default="cpu", help="default cpu; cuda on a GPU machine")
    args = parser.parse_args()
    _common.configure()
    convs = [_common.conversation(c) for c in make_contents(COUNT, seed=9)]
    settings: dict[str, Any] = {"max_batch_size": 16}
    if args.max_prefill_tokens is not None:
        settings["max_prefill_tokens"] = args.max_prefill_tokens
    rounds = []
    with tempfile.TemporaryDirectory(prefix="idefics-kit-diag-") as tmp:
        path = _common.build_checkpoint(args.family, Path(tmp))
        gen = Generator.from_pretrained(path, device=args.device, **settings)
        try:
            gen.generate(convs[0], max_new_tokens=SHORT)  # warm-up
            for number in range(args.rounds):
                closed = closed_loop(gen, convs, args.stagger, seed=number)
                lone = lone_short(gen, convs)
                ratio = round(closed["short"]["total"] / lone["total"], 2)
                rounds.append({"closed": closed, "lone_short": lone, "ratio": ratio})
                print(
                    f"round {number}: short p50 closed/lone {ratio}; stages p50 s closed "
                    f"{closed['short']} lone {lone}; rows per admission "
                    f"{closed['rows_per_admission']}, per step {closed['rows_per_step']}, "
                    f"s per iteration {closed['seconds_per_iteration']}",
                    flush=True,
                )
        finally:
            gen.close()
    print(f"median ratio {statistics.median(r['ratio'] for r in rounds)}")
    name = f"diagnose_continuous_{args.family}_stagger{args.stagger:g}"
    if args.max_prefill_tokens is not None:
        name += f"_prefill{args.max_prefill_tokens}"
    path = _common.write_results(name, {"settings": vars(args), "rounds": rounds})
    print(f"wrote {path.relative_to(_common.ROOT)}")


if __name__ == "__main__":
    main()
