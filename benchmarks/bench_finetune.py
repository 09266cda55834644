"""Benchmark 11: ``finetune()`` throughput and peak memory, LoRA vs full, small checkpoints.

For each family, ``finetune`` runs ``--steps`` optimizer steps (batch 4, one
picture and a 6-12 word answer per row) twice with LoRA (rank 16) and twice
with all weights (``full=True``), alternating LoRA, full, full, LoRA so that
drifting machine load hits both alike. Each run is its own process, so its
peak resident memory (VmHWM, or peak CUDA memory on a GPU) is its own. Reported:
training examples per second (rows x steps / training seconds, model loading
and row checks excluded; the better of the two runs), peak memory, trainable parameters, and the ratios
LoRA / full. ``size="small"`` checkpoints (text hidden 512 x 4 layers).

    .venv/bin/python benchmarks/bench_finetune.py [--quick] [--steps N] [--families F ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads

BATCH = 4
ROWS = 32
FAMILIES = ("idefics", "idefics2", "idefics3", "smolvlm")
MODES = ("lora", "full")


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB (10^6 bytes)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return float("nan")


def worker(checkpoint: str, mode: str, steps: int, out: str) -> dict[str, Any]:
    """One training run in this process; its numbers."""
    _common.configure()
    import torch

    from idefics_kit import Conversation
    from idefics_kit.finetune import finetune

    rng = random.Random(0)
    rows = [
        Conversation()
        .user(_common.picture(rng.randint(24, 64), rng.randint(24, 64), seed=i), "describe it")
        .assistant(_common.words(rng, rng.randint(6, 12)))
        for i in range(ROWS)
    ]
    lines: list[str] = []
    result = finetune(
        checkpoint,
        rows,
        out,
        full=mode == "full",
        max_steps=steps,
        batch_size=BATCH,
        save_steps=10_000,
        progress=False,
        log=lines.append,
    )
    # "training N of M parameters (...)"
    counted = next(line for line in lines if line.startswith("training "))
    trainable, total = (int(word.replace(",", "")) for word in counted.split()[1:4:2])
    cuda = torch.cuda.is_available()
    return {
        "examples_per_s": round(steps * BATCH / result.train_seconds, 2),
        "train_seconds": round(result.train_seconds, 2),
        "peak_mb": round(torch.cuda.max_memory_allocated() / 1e6, 1) if cuda else peak_mb(),
        "memory": "cuda max_memory_allocated" if cuda else "VmHWM (whole process)",
        "trainable": trainable,
        "parameters": total,
    }


def run_worker(checkpoint: Path, mode: str, steps: int, folder: Path, index: int) -> dict[str, Any]:
    out = folder / f"{checkpoint.name}-{mode}-{index}"
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(checkpoint), mode, str(steps), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 steps, one run per mode")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        checkpoint, mode, steps, out = args.worker
        print(json.dumps(worker(checkpoint, mode, int(steps), out)))
        return
    steps = 5 if args.quick else args.steps
    order = ("lora", "full") if args.quick else ("lora", "full", "full", "lora")
    results: dict[str, Any] = {}
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for family in args.families:
            checkpoint = _common.build_checkpoint(family, folder, size="small")
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for index, mode in enumerate(order):
                runs[mode].append(run_worker(checkpoint, mode, steps, folder, index))
            summary = {
                mode: {
                    # The best run: on a shared machine, slower runs measure the neighbours.
                    "examples_per_s": max(r["examples_per_s"] for r in runs[mode]),
                    "peak_mb": max(r["peak_mb"] for r in runs[mode]),
                    "trainable": runs[mode][0]["trainable"],
                    "runs": runs[mode],
                }
                for mode in MODES
            }
            speed = summary["lora"]["examples_per_s"] / summary["full"]["examples_per_s"]
            memory = summary["lora"]["peak_mb"] / summary["full"]["peak_mb"]
            results[family] = {
                **summary,
                "lora_over_full_speed": round(speed, 2),
                "lora_over_full_peak_memory": round(memory, 2),
            }
            rows.append(
                (
                    family,
                    f"{summary['lora']['examples_per_s']:.1f}",
                    f"{summary['full']['examples_per_s']:.1f}",
                    f"{speed:.2f}x",
                    f"{summary['lora']['peak_mb']:.0f}",
                    f"{summary['full']['peak_mb']:.0f}",
                    f"{memory:.2f}x",
                    f"{summary['lora']['trainable']:,} / {summary['full']['trainable']:,}",
                )
            )
    print(
        _common.table(
            (
                "family",
                "LoRA ex/s",
                "full ex/s",
                "LoRA/full",
                "LoRA peak MB",
                "full peak MB",
                "LoRA/full",
                "trained params LoRA / full",
            ),
            rows,
        )
    )
    path = _common.write_results(
        "finetune",
        {
            "steps": steps,
            "batch_size": BATCH,
            "checkpoint_size": "small",
            "load_average_at_end": os.getloadavg(),
            "seconds": round(time.perf_counter() - started, 1),
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
