"""Benchmark 1: per-call overhead of ``Generator.generate`` against raw transformers.

For each family, on its "small" random-weight checkpoint: one conversation
(one image, one question), 32 new tokens, greedy. Three sides, run
alternately:

* SDK: ``gen.generate(conv)`` with default settings (vision cache on), the
  cache cleared before each call so that the vision encoder runs every time,
  as it does on the raw side and as it does for a stream of distinct images;
* SDK, cache off: the same with ``vision_cache_mb=0``;
* raw: the processor (chat template or IDEFICS 1 prompt list), ``model.generate``
  with the same stop, banned and pad ids, and a decode of the answer.

All get the same already-decoded PIL image; identical generated ids are
checked before timing.

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads

from idefics_kit import Generator, Result

FAMILIES = ("idefics", "idefics2", "idefics3", "smolvlm")
MAX_NEW_TOKENS = 32
TARGET_RATIO = 1.03
QUESTION = "What is in this image?"


def bench_family(family: str, root: Path, runs: int) -> dict[str, Any]:
    path = _common.build_checkpoint(family, root)
    gen = Generator.from_pretrained(path, device="cpu")  # default: vision cache on
    plain = Generator.from_model(gen.model, gen.processor, vision_cache_mb=0)
    reference = _common.Reference(gen, family)
    content: _common.Content = [QUESTION, _common.picture(64, 48, seed=1)]
    conv = _common.conversation(content)

    def sdk() -> Result:
        # Every call sees a new image, as in a stream of distinct requests: a
        # warm cache would skip the vision encoder that the raw side runs.
        gen.clear_vision_cache()
        return gen.generate(conv, max_new_tokens=MAX_NEW_TOKENS)

    def sdk_no_cache() -> Result:
        return plain.generate(conv, max_new_tokens=MAX_NEW_TOKENS)

    raw_ids = reference.generate([content], MAX_NEW_TOKENS)[0]
    raw_prompt = reference.encode([content])["input_ids"][0].tolist()
    if gen.prompt_token_ids(conv) != tuple(raw_prompt):
        raise AssertionError(f"{family}: SDK and raw prompts differ")
    for side, result in (("SDK", sdk()), ("SDK without cache", sdk_no_cache())):
        if result.token_ids != tuple(raw_ids):
            raise AssertionError(
                f"{family}: {side} and raw generated ids differ:\n"
                f"  {side} {list(result.token_ids)}\n  raw {raw_ids}"
            )

    timings = _common.interleaved(
        {
            "sdk": sdk,
            "sdk_no_cache": sdk_no_cache,
            "raw": lambda: reference.generate([content], MAX_NEW_TOKENS),
        },
        runs=runs,
    )
    times = timings.seconds
    stats = {side: _common.summary(seconds) for side, seconds in times.items()}
    raw_median, raw_min = float(stats["raw"]["median_s"]), float(stats["raw"]["min_s"])
    return {
        "family": family,
        "prompt_tokens": len(raw_prompt),
        "generated_tokens": len(raw_ids),
        "identical_ids": True,
        **stats,
        "ratio_of_medians": {
            side: round(float(stats[side]["median_s"]) / raw_median, 4)
            for side in ("sdk", "sdk_no_cache")
        },
        "ratio_of_mins": {
            side: round(float(stats[side]["min_s"]) / raw_min, 4)
            for side in ("sdk", "sdk_no_cache")
        },
        "median_paired_ratio": {
            side: round(_common.paired_ratio(times[side], times["raw"]), 4)
            for side in ("sdk", "sdk_no_cache")
        },
        "foreign_cpu_share": timings.foreign_cpu_share,
        "rejected_noisy_rounds": timings.rejected_rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 timed runs instead of 30")
    parser.add_argument("--runs", type=int, help="timed runs per side and family (>= 10)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    args = parser.parse_args()
    runs = args.runs or (10 if args.quick else 30)
    _common.configure()

    rows = []
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        for family in args.families.split(","):
            row = bench_family(family, Path(tmp), runs)
            rows.append(row)
            print(
                f"{family}: SDK {_common.ms(row['sdk']['median_s'])} ms, SDK without cache "
                f"{_common.ms(row['sdk_no_cache']['median_s'])} ms, raw "
                f"{_common.ms(row['raw']['median_s'])} ms (other processes used "
                f"{row['foreign_cpu_share']:.0%} of the CPUs, {row['rejected_noisy_rounds']} "
                "noisy rounds rerun)",
                flush=True,
            )

    print()
    print(
        f"Overhead: gen.generate vs raw transformers, 1 image + question, "
        f"max_new_tokens={MAX_NEW_TOKENS}, {runs} interleaved runs per side, median (min) ms"
    )

    def verdict(ratio: float) -> str:
        return "met" if ratio <= TARGET_RATIO else f"MISSED by {ratio - TARGET_RATIO:.3f}"

    print(
        _common.table(
            ["family", "SDK", "SDK no cache", "raw", "SDK/raw", "no cache/raw", "target 1.03"],
            [
                [
                    r["family"],
                    f"{_common.ms(r['sdk']['median_s'])} ({_common.ms(r['sdk']['min_s'])})",
                    f"{_common.ms(r['sdk_no_cache']['median_s'])} "
                    f"({_common.ms(r['sdk_no_cache']['min_s'])})",
                    f"{_common.ms(r['raw']['median_s'])} ({_common.ms(r['raw']['min_s'])})",
                    f"{r['ratio_of_medians']['sdk']:.3f}",
                    f"{r['ratio_of_medians']['sdk_no_cache']:.3f}",
                    verdict(max(r["ratio_of_medians"].values())),
                ]
                for r in rows
            ],
        )
    )
    path = _common.write_results(
        "overhead",
        {
            "settings": {
                "checkpoint": "build_tiny_checkpoint(size='small'), float32, CPU",
                "max_new_tokens": MAX_NEW_TOKENS,
                "runs": runs,
                "warmup_runs": 2,
                "sdk": "Generator.from_pretrained defaults (vision cache on, cleared per call)",
                "sdk_no_cache": "Generator.from_model(..., vision_cache_mb=0)",
                "target_ratio": TARGET_RATIO,
            },
            "families": rows,
        },
    )
    print(f"\nwrote {path.relative_to(_common.ROOT)}")


if __name__ == "__main__":
    main()
