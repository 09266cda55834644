"""Benchmark 6: ``idefics-kit batch`` locally vs ``batch --ray`` with 1 and 2 actors.

500 toy-model questions (every question kind; images 64-144 px, half inline
base64, half PNG files), greedy, batch size 8, each side run as the command a
user types, in a fresh process, one after the other in the same run:

* local: ``idefics-kit batch in.jsonl -o out.jsonl`` (torch: 2 threads);
* Ray, 1 actor: ``batch --ray --actors 1 --cpus-per-actor 2`` (2 threads);
* Ray, 2 actors: ``batch --ray --actors 2 --cpus-per-actor 1`` (1 thread each).

The Ray sides start their own local Ray instance (no ``--ray-address``), so
their wall time includes starting Ray, the actors' processes and one model
load per actor. Start-up cost is the wall time of the same command on a
one-row input. Rows/s is given end to end (rows / wall time) and steady
(rows written between the first and the last write / time between them; rows
are written a window or a Ray task at a time). The output rows of every side
are checked equal. ``uptime``'s load average is recorded before and
after each run: on a shared machine, read the numbers with it.

    .venv/bin/python benchmarks/bench_ray.py [--rows N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads

from idefics_kit import Conversation, ImagePart
from idefics_kit.toy.scenes import QUESTIONS, draw_count_scene, draw_scene

SIDES: dict[str, list[str]] = {
    "local": [],
    "ray, 1 actor": ["--ray", "--actors", "1", "--cpus-per-actor", "2"],
    "ray, 2 actors": ["--ray", "--actors", "2", "--cpus-per-actor", "1"],
}


def write_input(folder: Path, count: int) -> Path:
    rng = random.Random(2026)
    kinds = list(QUESTIONS)
    path = folder / f"in{count}.jsonl"
    with path.open("w") as file:
        for number in range(count):
            kind = kinds[number % len(kinds)]
            size = (rng.randint(64, 144), rng.randint(64, 144))
            scene = (
                draw_count_scene(rng, size=size) if kind == "count" else draw_scene(rng, size=size)
            )
            if number % 2:
                image_path = folder / f"scene{number}.png"
                scene.image.save(image_path)
                image = ImagePart.from_path(str(image_path))
            else:
                image = ImagePart.from_pil(scene.image)
            messages = Conversation().user(image, QUESTIONS[kind]).to_messages()
            file.write(json.dumps({"id": f"q{number:04d}", "messages": messages}) + "\n")
    return path


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def run(side: str, input_path: Path, output: Path) -> dict[str, Any]:
    """Run one side: wall time, when the first and the last rows were written, load."""
    command = [sys.executable, "-m", "idefics_kit", "batch", "--quiet", *SIDES[side]]
    command += [str(input_path), "-o", str(output)]
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "2"}
    before = load()
    started = time.monotonic()
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    first: tuple[float, int] | None = None
    last: tuple[float, int] = (0.0, 0)
    while process.poll() is None:
        count = _count(output)
        if count and first is None:
            first = (time.monotonic() - started, count)
        if count > last[1]:
            last = (time.monotonic() - started, count)
        time.sleep(0.1)
    wall = time.monotonic() - started
    stderr = process.stderr.read() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{side} failed ({process.returncode}): {stderr}")
    count = _count(output)
    if count > last[1]:
        last = (wall, count)
    first = first or last
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else None
    return {
        "wall_s": round(wall, 2),
        "first_rows_s": round(first[0], 2),
        "first_rows": first[1],
        "last_row_s": round(last[0], 2),
        "rows_per_s_between_first_and_last": None if steady is None else round(steady, 2),
        "load_before": before,
        "load_after": load(),
    }


def _count(output: Path) -> int:
    files = sorted(output.glob("part-*.jsonl")) if output.is_dir() else [output]
    return sum(file.read_bytes().count(b"\n") for file in files if file.exists())


def _rows(output: Path) -> list[dict[str, Any]]:
    files = sorted(output.glob("part-*.jsonl")) if output.is_dir() else [output]
    rows = []
    for file in files:
        if file.exists():
            rows += [json.loads(line) for line in file.read_text().splitlines() if line]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="60 rows")
    args = parser.parse_args()
    count = 60 if args.quick else args.rows
    results: dict[str, Any] = {"rows": count, "sides": {}}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        big, one = write_input(folder, count), write_input(folder, 1)
        reference: dict[str, Any] | None = None
        for side in SIDES:
            suffix = ".jsonl" if side == "local" else ""
            startup = run(side, one, folder / f"one-{side}{suffix}")
            timed = run(side, big, folder / f"big-{side}{suffix}")
            rows = {row["id"]: row for row in _rows(folder / f"big-{side}{suffix}")}
            assert len(rows) == count, (side, len(rows))
            if reference is None:
                reference = rows
            assert rows == reference, f"{side}: rows differ from the local command's"
            results["sides"][side] = {
                **timed,
                "startup_s": startup["wall_s"],
                "startup_load_before": startup["load_before"],
                "rows_per_s": round(count / timed["wall_s"], 2),
            }
            print(f"{side}: {results['sides'][side]}", flush=True)
            for leftover in folder.glob("*-" + side + "*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
    print()
    print(
        _common.table(
            ["side", "1-row job s", "first rows at s", "wall s", "rows/s", "rows/s steady", "load"],
            [
                (
                    side,
                    f"{r['startup_s']:.1f}",
                    f"{r['first_rows_s']:.1f} ({r['first_rows']})",
                    f"{r['wall_s']:.1f}",
                    f"{r['rows_per_s']:.2f}",
                    f"{r['rows_per_s_between_first_and_last'] or 0:.2f}",
                    " ".join(str(x) for x in r["load_before"]),
                )
                for side, r in results["sides"].items()
            ],
        )
    )
    if not args.quick:
        print(_common.write_results("ray", results))


if __name__ == "__main__":
    main()
