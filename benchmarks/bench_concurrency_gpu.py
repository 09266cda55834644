"""Benchmark 5 on a GPU: concurrent callers on a full-size IDEFICS 2 (random bf16 weights).

The model of benchmark ``bench_gpu_idefics2.py`` (idefics2-8b's architecture,
built on the GPU, nothing downloaded), wrapped in one Generator with
``max_batch_size=16``; then the sides of ``bench_concurrency.py``: 16 threads
and 16 asyncio tasks asking 4 questions each, the same 64 one after another,
one ``generate_batch`` over all 64 (the ceiling), and raw transformers
singles. In bf16, batched kernels may round differently from single-row ones,
so a few greedy answers can differ between sides; the script counts them.

    .venv/bin/python benchmarks/bench_concurrency_gpu.py [--quick]   # needs CUDA
    .venv/bin/python benchmarks/bench_concurrency_gpu.py --cpu-smoke # whole script, small model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
import bench_concurrency
import bench_gpu_idefics2
import torch
from bench_batching import make_contents

from idefics_kit import Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="scaled-down model on the CPU")
    parser.add_argument("--quick", action="store_true", help="2 timed runs instead of 3")
    args = parser.parse_args()
    runs = 1 if args.cpu_smoke else (2 if args.quick else 3)
    share_runs = 1 if args.cpu_smoke else (3 if args.quick else 6)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("bench_concurrency_gpu.py: no CUDA device; use --cpu-smoke here")
    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    _common.configure(threads=2 if args.cpu_smoke else torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        tiny = _common.build_checkpoint("idefics2", Path(tmp), size="tiny")
        processor = bench_gpu_idefics2.build_processor(tiny, image_splitting=False)
        tokenizer = processor.tokenizer
        config = bench_gpu_idefics2.idefics2_8b_config(
            tokenizer.convert_tokens_to_ids("<image>"),
            tokenizer.pad_token_id,
            smoke=args.cpu_smoke,
        )
        stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<end_of_utterance>")]
        model = bench_gpu_idefics2.build_model(config, device, dtype, stop_ids)
        gen = Generator.from_model(model, processor, max_batch_size=bench_concurrency.BATCH)
        contents = make_contents(bench_concurrency.COUNT, seed=5)
        row = bench_concurrency.measure(
            gen, _common.Reference(gen, "idefics2"), contents, runs, share_runs
        )
    bench_concurrency.report(
        row,
        runs,
        share_runs,
        "concurrency_gpu_smoke" if args.cpu_smoke else "concurrency_gpu",
        "idefics2-8b architecture, random weights, "
        + ("scaled down, float32, CPU (smoke)" if args.cpu_smoke else "bfloat16, CUDA"),
    )


if __name__ == "__main__":
    main()
