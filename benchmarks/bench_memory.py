"""Benchmark 4: memory of ``Generator.iter_batch`` over a long job.

2,000 conversations (``--count``) whose images are PNG files on disk: 50
distinct pictures of varied sizes in a temporary folder, each conversation
``ImagePart.from_path`` of one of them in turn and a short question. The
conversations are produced lazily and each result is dropped as soon as it
arrives, so memory should stay flat after the first windows. Resident memory
(VmRSS) and its peak (VmHWM) are read from /proc/self/status every 200
results. Tiny IDEFICS 2 checkpoint, max_new_tokens=2: this measures the SDK's
bookkeeping, not the model.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--count N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads

from idefics_kit import Conversation, Generator, ImagePart

IMAGES = 50
MAX_NEW_TOKENS = 2
MAX_GROWTH_MB = 32.0
"""Largest allowed growth of VmRSS between the first sample and the last."""


def status_mb() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MB (10^6 bytes)."""
    values: dict[str, float] = {}
    with open("/proc/self/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = round(int(rest.split()[0]) * 1024 / 1e6, 1)
    return values


def write_pictures(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct noisy PNGs of varied sizes (16-320 px a side)."""
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        width, height = rng.randint(16, 320), rng.randint(16, 320)
        path = folder / f"picture-{index:02d}.png"
        _common.picture(width, height, seed=index).save(path)
        paths.append(path)
    return paths


def conversations(paths: list[Path], count: int) -> Iterator[Conversation]:
    """``count`` conversations cycling over ``paths``, built one at a time."""
    rng = random.Random(1)
    for index in range(count):
        image = ImagePart.from_path(paths[index % len(paths)])
        yield Conversation().user(image, _common.words(rng, rng.randint(3, 12)) + "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, help="conversations (default 2000; --quick: 600)")
    parser.add_argument("--every", type=int, default=200, help="results between samples")
    parser.add_argument("--quick", action="store_true", help="600 conversations")
    args = parser.parse_args()
    count = args.count or (600 if args.quick else 2000)
    if count < 2 * args.every:
        parser.error(f"--count must be at least twice --every ({args.every})")
    _common.configure()

    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        root = Path(tmp)
        gen = Generator.from_pretrained(
            _common.build_checkpoint("idefics2", root, size="tiny"), device="cpu"
        )
        (root / "pictures").mkdir()
        paths = write_pictures(root / "pictures", IMAGES)
        before = status_mb()
        start = time.perf_counter()
        done = failed = 0
        for result in gen.iter_batch(conversations(paths, count), max_new_tokens=MAX_NEW_TOKENS):
            done += 1
            failed += not result.ok
            del result
            if done % args.every == 0 or done == count:
                sample = {"results": done, "seconds": round(time.perf_counter() - start, 1)}
                samples.append({**sample, **status_mb()})
                print(
                    f"{done:>6} results  {sample['seconds']:>6.1f} s  "
                    f"VmRSS {samples[-1]['VmRSS']:>7.1f} MB  VmHWM {samples[-1]['VmHWM']:>7.1f} MB",
                    flush=True,
                )
        cache = gen.vision_cache
    if done != count or failed:
        raise AssertionError(f"expected {count} good results, got {done} ({failed} failed)")

    first, last = samples[0], samples[-1]
    growth = round(last["VmRSS"] - first["VmRSS"], 1)
    peak_growth = round(last["VmHWM"] - first["VmHWM"], 1)
    print()
    print(
        f"iter_batch over {count} conversations ({IMAGES} PNGs on disk), "
        f"tiny idefics2, max_new_tokens={MAX_NEW_TOKENS}"
    )
    print(
        _common.table(
            ["", f"at {first['results']}", f"at {last['results']}", "growth"],
            [
                ["VmRSS MB", first["VmRSS"], last["VmRSS"], f"{growth:+.1f}"],
                ["VmHWM MB", first["VmHWM"], last["VmHWM"], f"{peak_growth:+.1f}"],
            ],
        )
    )
    print(
        f"before the job: VmRSS {before['VmRSS']} MB; {count / last['seconds']:.0f} conversations/s"
    )
    if cache is not None:
        print(
            f"vision cache (default, on): {cache.entries} entries, {cache.megabytes:.2f} MB "
            f"of {cache.max_megabytes:.0f} MB, {cache.hits} hits, {cache.misses} misses"
        )
    path = _common.write_results(
        "memory",
        {
            "settings": {
                "checkpoint": "build_tiny_checkpoint('idefics2', size='tiny'), float32, CPU",
                "conversations": count,
                "distinct_png_files": IMAGES,
                "max_new_tokens": MAX_NEW_TOKENS,
                "batch_size": "default (8)",
                "window": "default (32)",
                "vision_cache_mb": "default (256)",
                "max_growth_mb": MAX_GROWTH_MB,
            },
            "before_job": before,
            "samples": samples,
            "rss_growth_mb": growth,
            "peak_growth_mb": peak_growth,
            "conversations_per_s": round(count / last["seconds"], 1),
            "vision_cache": None
            if cache is None
            else {
                "entries": cache.entries,
                "megabytes": round(cache.megabytes, 3),
                "max_megabytes": cache.max_megabytes,
                "hits": cache.hits,
                "misses": cache.misses,
            },
        },
    )
    print(f"wrote {path.relative_to(_common.ROOT)}")
    if growth > MAX_GROWTH_MB:
        raise SystemExit(
            f"FAIL: VmRSS grew by {growth} MB between {first['results']} and "
            f"{last['results']} results (limit {MAX_GROWTH_MB} MB)"
        )
    print(f"OK: VmRSS grew by {growth} MB (limit {MAX_GROWTH_MB} MB)")


if __name__ == "__main__":
    main()
