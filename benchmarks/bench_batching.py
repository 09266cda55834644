"""Benchmark 2: batched generation against raw transformers, singles and batches.

32 conversations of mixed lengths (1-3 images of varied sizes from a fixed
seed, 5-60 words of text) on the "small" IDEFICS 2 and IDEFICS 3 checkpoints,
24 new tokens, greedy. Four sides, run alternately:

* SDK: ``gen.generate_batch(convs, batch_size=8)`` (length-aware micro-batches),
  default settings, the vision cache cleared before each run (the raw sides
  run the vision encoder every time);
* SDK, cache off: the same with ``vision_cache_mb=0``;
* raw batched: the processor on 8 conversations at a time in input order
  (left padding), then ``model.generate`` with the SDK's stop/banned/pad ids;
* raw singles: one processor + ``model.generate`` call per conversation.

Greedy outputs (token ids cut at the first stop id) are compared between the
three before timing; differences caused by padding numerics are counted.

    .venv/bin/python benchmarks/bench_batching.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads

from idefics_kit import Generator, Result
from idefics_kit.batching import plan

FAMILIES = ("idefics2", "idefics3")
COUNT = 32
BATCH_SIZE = 8
MAX_NEW_TOKENS = 24
TARGET_SPEEDUP_VS_RAW_BATCHED = 1.2
SDK_SIDES = ("sdk", "sdk_no_cache")
SIDES = (*SDK_SIDES, "raw_batched", "raw_singles")


def make_contents(count: int, seed: int = 0) -> list[_common.Content]:
    """``count`` user turns: 1-3 images of varied sizes and aspect ratios, 5-60 words."""
    rng = random.Random(seed)
    contents: list[_common.Content] = []
    for index in range(count):
        images = [
            _common.picture(rng.randint(24, 200), rng.randint(24, 200), seed=100 * index + n)
            for n in range(rng.randint(1, 3))
        ]
        text = _common.words(rng, rng.randint(5, 60))
        layout = rng.choice(("images first", "text first", "interleaved"))
        content: list[str | Any]
        if layout == "images first":
            content = [*images, text]
        elif layout == "text first":
            content = [text, *images]
        else:
            head, tail = text.split(" ", 1) if " " in text else (text, "")
            content = [head, *images, tail] if tail else [head, *images]
        contents.append(content)
    return contents


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def sdk_work(gen: Generator, results: list[Result], prompts: list[int]) -> dict[str, int]:
    """Decoding steps and padded prompt tokens of the SDK's micro-batches (its own planner)."""
    steps = padded = row_steps = 0
    groups = [()] * len(prompts)
    for batch in plan(prompts, groups, BATCH_SIZE):
        # A row that stopped ran one more step (for its stop token) than it kept.
        batch_steps = max(
            len(results[i].token_ids) + (results[i].finish_reason == "stop") for i in batch
        )
        steps += batch_steps
        row_steps += batch_steps * len(batch)
        padded += max(prompts[i] for i in batch) * len(batch)
    return {"decode_steps": steps, "row_steps": row_steps, "padded_prompt_tokens": padded}


def raw_work(runs: list[_common.RawRun]) -> dict[str, int]:
    return {
        "decode_steps": sum(run.steps for run in runs),
        "row_steps": sum(run.steps * len(run.answers) for run in runs),
        "padded_prompt_tokens": sum(run.prompt_width * len(run.answers) for run in runs),
    }


def bench_family(family: str, root: Path, runs: int) -> dict[str, Any]:
    path = _common.build_checkpoint(family, root)
    gen = Generator.from_pretrained(path, device="cpu")  # default: vision cache on
    plain = Generator.from_model(gen.model, gen.processor, vision_cache_mb=0)
    reference = _common.Reference(gen, family)
    contents = make_contents(COUNT)
    convs = [_common.conversation(content) for content in contents]

    def sdk() -> list[Result]:
        # A cold cache each run: the raw sides run the vision encoder every time.
        gen.clear_vision_cache()
        return gen.generate_batch(convs, batch_size=BATCH_SIZE, max_new_tokens=MAX_NEW_TOKENS)

    def sdk_no_cache() -> list[Result]:
        return plain.generate_batch(convs, batch_size=BATCH_SIZE, max_new_tokens=MAX_NEW_TOKENS)

    def raw_batched() -> list[_common.RawRun]:
        return [reference.run(chunk, MAX_NEW_TOKENS) for chunk in chunks(contents, BATCH_SIZE)]

    def raw_singles() -> list[_common.RawRun]:
        return [reference.run([content], MAX_NEW_TOKENS) for content in contents]

    # Correctness first (also the first warm-up round).
    prompts = [len(gen.prompt_token_ids(conv)) for conv in convs]
    sdk_results = sdk()
    no_cache_results = sdk_no_cache()
    batched_runs = raw_batched()
    single_runs = raw_singles()
    single_prompts = [run.prompt_tokens[0] for run in single_runs]
    if prompts != single_prompts:
        raise AssertionError(f"{family}: SDK and raw prompt lengths differ")
    for conv, content in zip(convs, contents, strict=True):
        raw_prompt = reference.encode([content])["input_ids"][0].tolist()
        if gen.prompt_token_ids(conv) != tuple(raw_prompt):
            raise AssertionError(f"{family}: SDK and raw prompt ids differ")
    sdk_ids = [list(result.token_ids) for result in sdk_results]
    no_cache_ids = [list(result.token_ids) for result in no_cache_results]
    batched_ids = [ids for run in batched_runs for ids in run.answers]
    single_ids = [run.answers[0] for run in single_runs]

    def differ(a: list[list[int]], b: list[list[int]]) -> int:
        return sum(x != y for x, y in zip(a, b, strict=True))

    comparison = {
        "sdk_batch_vs_raw_singles": differ(sdk_ids, single_ids),
        "raw_batched_vs_raw_singles": differ(batched_ids, single_ids),
        "sdk_batch_vs_raw_batched": differ(sdk_ids, batched_ids),
        "sdk_batch_vs_sdk_no_cache": differ(sdk_ids, no_cache_ids),
    }
    tokens = {
        "sdk": sum(len(ids) for ids in sdk_ids),
        "sdk_no_cache": sum(len(ids) for ids in no_cache_ids),
        "raw_batched": sum(len(ids) for ids in batched_ids),
        "raw_singles": sum(len(ids) for ids in single_ids),
    }
    work = {
        "sdk": sdk_work(gen, sdk_results, prompts),
        "sdk_no_cache": sdk_work(gen, no_cache_results, prompts),
        "raw_batched": raw_work(batched_runs),
        "raw_singles": raw_work(single_runs),
    }
    stopped_early = sum(result.finish_reason == "stop" for result in sdk_results)

    timings = _common.interleaved(
        {
            "sdk": sdk,
            "sdk_no_cache": sdk_no_cache,
            "raw_batched": raw_batched,
            "raw_singles": raw_singles,
        },
        runs=runs,
        warmup=1,
    )
    times = timings.seconds
    stats = {side: _common.summary(seconds) for side, seconds in times.items()}
    return {
        "family": family,
        "conversations": COUNT,
        "prompt_tokens": {"total": sum(prompts), "min": min(prompts), "max": max(prompts)},
        "images": sum(1 for content in contents for part in content if not isinstance(part, str)),
        "rows_stopped_before_max_new_tokens": stopped_early,
        "generated_tokens": tokens,
        "work": work,
        "differing_outputs": comparison,
        "times": stats,
        "tokens_per_s": {
            side: round(tokens[side] / float(stats[side]["median_s"]), 1) for side in stats
        },
        "speedup_vs_raw_singles": {
            side: round(float(stats["raw_singles"]["median_s"]) / float(stats[side]["median_s"]), 3)
            for side in SDK_SIDES
        },
        "speedup_vs_raw_batched": {
            side: round(float(stats["raw_batched"]["median_s"]) / float(stats[side]["median_s"]), 3)
            for side in SDK_SIDES
        },
        "paired_speedup_vs_raw_batched": {
            side: round(_common.paired_ratio(times["raw_batched"], times[side]), 3)
            for side in SDK_SIDES
        },
        "foreign_cpu_share": timings.foreign_cpu_share,
        "rejected_noisy_rounds": timings.rejected_rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 timed runs instead of 10")
    parser.add_argument("--runs", type=int, help="timed runs per side and family")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 10)
    _common.configure()

    rows = []
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        for family in args.families.split(","):
            row = bench_family(family, Path(tmp), runs)
            rows.append(row)
            medians = ", ".join(f"{side} {row['times'][side]['median_s']:.2f} s" for side in SIDES)
            print(
                f"{family}: {medians} (other processes used {row['foreign_cpu_share']:.0%} of "
                f"the CPUs, {row['rejected_noisy_rounds']} noisy rounds rerun)",
                flush=True,
            )

    print()
    print(
        f"Batching: {COUNT} mixed conversations, batch_size={BATCH_SIZE}, "
        f"max_new_tokens={MAX_NEW_TOKENS}, {runs} interleaved runs per side (median s)"
    )
    print(
        _common.table(
            ["family", "side", "median s", "min s", "gen tokens", "tokens/s", "padded prompt"],
            [
                [
                    r["family"],
                    side,
                    f"{r['times'][side]['median_s']:.3f}",
                    f"{r['times'][side]['min_s']:.3f}",
                    r["generated_tokens"][side],
                    r["tokens_per_s"][side],
                    r["work"][side]["padded_prompt_tokens"],
                ]
                for r in rows
                for side in SIDES
            ],
        )
    )
    print()

    def verdict(speedup: float) -> str:
        target = TARGET_SPEEDUP_VS_RAW_BATCHED
        return "met" if speedup >= target else f"MISSED by {target - speedup:.2f}x"

    print(
        _common.table(
            ["family", "side", "vs raw singles", "vs raw batched", "target 1.2x"],
            [
                [
                    r["family"],
                    side,
                    f"{r['speedup_vs_raw_singles'][side]:.2f}x",
                    f"{r['speedup_vs_raw_batched'][side]:.2f}x",
                    verdict(r["speedup_vs_raw_batched"][side]),
                ]
                for r in rows
                for side in SDK_SIDES
            ],
        )
    )
    for r in rows:
        differing = ", ".join(f"{k} {v}/{COUNT}" for k, v in r["differing_outputs"].items())
        print(f"{r['family']}: differing answers: {differing}")
    path = _common.write_results(
        "batching",
        {
            "settings": {
                "checkpoint": "build_tiny_checkpoint(size='small'), float32, CPU",
                "conversations": COUNT,
                "batch_size": BATCH_SIZE,
                "max_new_tokens": MAX_NEW_TOKENS,
                "runs": runs,
                "sdk": "Generator.from_pretrained defaults (vision cache on, cleared per run)",
                "sdk_no_cache": "Generator.from_model(..., vision_cache_mb=0)",
                "target_speedup_vs_raw_batched": TARGET_SPEEDUP_VS_RAW_BATCHED,
            },
            "families": rows,
        },
    )
    print(f"\nwrote {path.relative_to(_common.ROOT)}")


if __name__ == "__main__":
    main()
