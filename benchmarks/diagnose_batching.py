"""Where benchmark 2's time goes: a breakdown of the SDK side, and profiles.

Same 32 conversations, checkpoints and settings as ``bench_batching.py``.
Timed alternately (median of ``--runs``):

* ``model: SDK grouping`` / ``model: input order``: only ``model.generate`` on
  pre-collated micro-batches, length-sorted (the SDK's plan) or in input order
  (raw batching): what length-aware grouping saves in model time; the same
  with 1 new token (vision encoder and prefill only);
* ``inputs only``: the SDK's per-conversation preparation (checks, image
  decoding, the processor on one conversation at a time) against the
  processor on 8 conversations at a time, as raw batching calls it;
* ``prepare serially, then run``: the SDK's preparation of the 32 conversations
  in this thread, then its micro-batch runner (``runner.run_wave``);
* ``prepare in a pool, run while it lives``: the same, preparation in a
  2-thread pool that is still alive while the model runs (what
  ``generate_batch`` does);
* ``prepare in a pool, shut it, then run``: the pool's threads have exited;
* ``generate_batch (cache off)`` and ``generate_batch (cache on, cold)``.

Run with ``OMP_WAIT_POLICY=PASSIVE`` as the control experiment: OpenMP's
threads then never spin-wait, and ``prepare serially, then run`` should become
as slow as ``prepare in a pool, run while it lives``.

``--profile`` also writes pyinstrument profiles of the two ``generate_batch``
sides to ``benchmarks/results/profile_batching_<family>_<side>.txt``
(``pip install pyinstrument``; not a dependency of the project).

    .venv/bin/python benchmarks/diagnose_batching.py [--runs N] [--profile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
import bench_batching
import torch
from transformers import BatchFeature

from idefics_kit import GenerationOptions, Generator, runner
from idefics_kit.batching import collate, plan

BATCH = bench_batching.BATCH_SIZE
MAX_NEW = bench_batching.MAX_NEW_TOKENS


def sides_for(gen: Generator, cached: Generator, family: str) -> dict[str, Callable[[], object]]:
    model, adapter = gen.model, gen._adapter
    reference = _common.Reference(gen, family)
    contents = bench_batching.make_contents(bench_batching.COUNT)
    convs = [_common.conversation(content) for content in contents]
    options = GenerationOptions(max_new_tokens=MAX_NEW)

    def prepare(index: int, conv: object) -> runner.Prepared:
        return runner.prepare(adapter, index, conv, numbered=True)

    items = [prepare(index, conv) for index, conv in enumerate(convs)]
    grouped = [
        BatchFeature(
            collate(
                [inputs for i in batch if (inputs := items[i].inputs) is not None],
                adapter.sequence_keys,
            )
        )
        for batch in plan([i.length for i in items], [i.group for i in items], BATCH)
    ]
    in_order = [reference.encode(chunk) for chunk in bench_batching.chunks(contents, BATCH)]
    kwargs: dict[str, Any] = {
        "do_sample": False,
        "num_beams": 1,
        "eos_token_id": reference.stop_ids,
        "bad_words_ids": reference.bad_words_ids,
        "pad_token_id": reference.pad_token_id,
        "max_new_tokens": MAX_NEW,
    }

    def model_only(batches: list[Any], new_tokens: int = MAX_NEW) -> Callable[[], object]:
        settings = {**kwargs, "max_new_tokens": new_tokens}

        def run() -> object:
            with torch.inference_mode():
                return [model.generate(**batch, **settings) for batch in batches]

        return run

    def serial() -> object:
        prepared = [prepare(index, conv) for index, conv in enumerate(convs)]
        return runner.run_wave(model, adapter, prepared, options, BATCH, "raise")

    def pool_alive() -> object:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(prepare, index, conv) for index, conv in enumerate(convs)]
            prepared = [future.result() for future in futures]
            return runner.run_wave(model, adapter, prepared, options, BATCH, "raise")

    def pool_closed() -> object:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(prepare, index, conv) for index, conv in enumerate(convs)]
            prepared = [future.result() for future in futures]
        return runner.run_wave(model, adapter, prepared, options, BATCH, "raise")

    def cache_cold() -> object:
        cached.clear_vision_cache()
        return cached.generate_batch(convs, batch_size=BATCH, max_new_tokens=MAX_NEW)

    return {
        "model: SDK grouping": model_only(grouped),
        "model: input order": model_only(in_order),
        "model, 1 new token: SDK grouping": model_only(grouped, 1),
        "model, 1 new token: input order": model_only(in_order, 1),
        "inputs only: SDK prepare, 32 x 1": lambda: [
            prepare(index, conv) for index, conv in enumerate(convs)
        ],
        "inputs only: processor, 4 x 8": lambda: [
            reference.encode(chunk) for chunk in bench_batching.chunks(contents, BATCH)
        ],
        "prepare serially, then run": serial,
        "prepare in a pool, run while it lives": pool_alive,
        "prepare in a pool, shut it, then run": pool_closed,
        "generate_batch (cache off)": lambda: gen.generate_batch(
            convs, batch_size=BATCH, max_new_tokens=MAX_NEW
        ),
        "generate_batch (cache on, cold)": cache_cold,
    }


def profile(name: str, run: Callable[[], object], path: Path) -> str:
    try:
        from pyinstrument import Profiler
    except ImportError as exc:
        raise SystemExit(
            "--profile needs pyinstrument: .venv/bin/pip install pyinstrument"
        ) from exc
    _common.wait_for_quiet(max_wait_s=60)
    profiler = Profiler(interval=0.001)
    with _common.ForeignLoad() as load:
        profiler.start()
        for _ in range(3):
            run()
        profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    body = text[text.index("Profile at") :] if "Profile at" in text else text
    header = (
        f"pyinstrument, 3 runs of: {name} "
        f"(other processes used {load.share:.0%} of the CPUs meanwhile)"
    )
    path.write_text(f"{header}\n\n{body}")
    return f"{header}\n{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side")
    parser.add_argument("--families", default=",".join(bench_batching.FAMILIES))
    parser.add_argument("--profile", action="store_true", help="write pyinstrument profiles")
    args = parser.parse_args()
    _common.configure()

    report: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        for family in args.families.split(","):
            path = _common.build_checkpoint(family, Path(tmp))
            gen = Generator.from_pretrained(path, device="cpu", vision_cache_mb=0)
            cached = Generator.from_model(gen.model, gen.processor)
            sides = sides_for(gen, cached, family)
            timings = _common.interleaved(sides, runs=args.runs, warmup=1)
            stats = {name: _common.summary(seconds) for name, seconds in timings.seconds.items()}
            print(
                f"\n{family}: {args.runs} interleaved runs, median (min) s; other processes "
                f"used {timings.foreign_cpu_share:.0%} of the CPUs"
            )
            print(
                _common.table(
                    ["side", "median s", "min s"],
                    [[n, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}"] for n, s in stats.items()],
                )
            )
            report.append({"family": family, "times": stats})
            if args.profile:
                for side in ("generate_batch (cache off)", "generate_batch (cache on, cold)"):
                    slug = "cache_off" if "off" in side else "cache_cold"
                    out = _common.RESULTS / f"profile_batching_{family}_{slug}.txt"
                    print(f"\n--- pyinstrument: {family}, {side} (3 runs) -> {out.name}")
                    print(profile(side, sides[side], out))
    # OMP_WAIT_POLICY=PASSIVE (no spin-waiting in OpenMP) is the control experiment
    # for the thread-pool effect; its results go to a file of their own.
    policy = os.environ.get("OMP_WAIT_POLICY")
    name = "diagnose_batching" + (f"_omp_{policy.lower()}" if policy else "")
    path = _common.write_results(
        name, {"omp_wait_policy": policy, "runs": args.runs, "families": report}
    )
    print(f"\nwrote {path.relative_to(_common.ROOT)}")


if __name__ == "__main__":
    main()
