"""Benchmark 5: benchmark 2's batching comparison on a GPU, full-size IDEFICS 2.

The model has the architecture of HuggingFaceM4/idefics2-8b (Mistral-7B text
model, SigLIP-so400m vision encoder at 980 px, 64-latent perceiver) with
random bf16 weights built directly on the GPU: nothing is downloaded. The
tokenizer and chat template come from a tiny IDEFICS 2 checkpoint built
offline (its ids fit in the 32,003-token vocabulary); its processor encodes
each image as 64 ``<image>`` tokens, as idefics2-8b does.

The 32 conversations of benchmark 2 (1-3 images, 5-60 words), 24 new tokens,
greedy; for each batch size (1, 8, 32): ``gen.generate_batch(convs,
batch_size=b)`` against raw transformers batching of the same conversations in
input order, ``b`` at a time (at 1: one call per conversation). Tokens/s per
side, and how many answers differ (bf16 padding numerics may flip a greedy
pick).

Expected cost on one H100: about a minute to start and build the model,
then ~3-5 minutes (``--quick``: ~3), most of it the 32 one-at-a-time calls of
batch size 1; ``--batch-sizes 8,32`` skips them.

    .venv/bin/python benchmarks/bench_gpu_idefics2.py [--quick]   # needs CUDA
    .venv/bin/python benchmarks/bench_gpu_idefics2.py --dry-run   # config and size only
    .venv/bin/python benchmarks/bench_gpu_idefics2.py --cpu-smoke # whole script, small model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
import bench_batching
import torch

from idefics_kit import Generator

BATCH_SIZES = (1, 8, 32)
MAX_NEW_TOKENS = 24
IMAGE_SEQ_LEN = 64
"""idefics2-8b: the perceiver's 64 latents, so 64 ``<image>`` tokens per image."""


def idefics2_8b_config(image_token_id: int, pad_token_id: int, *, smoke: bool = False) -> Any:
    """The published idefics2-8b configuration (``smoke``: the same shape, scaled down)."""
    from transformers import Idefics2Config

    text: dict[str, Any] = {
        "model_type": "mistral",
        "vocab_size": 32003,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "pad_token_id": pad_token_id,
    }
    vision: dict[str, Any] = {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 980,
        "patch_size": 14,
    }
    perceiver: dict[str, Any] = {
        "hidden_size": 4096,
        "resampler_n_latents": IMAGE_SEQ_LEN,
        "resampler_depth": 3,
        "resampler_n_heads": 16,
        "resampler_head_dim": 96,
        "num_key_value_heads": 4,
    }
    if smoke:
        text |= {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
        vision |= {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
        perceiver |= {"hidden_size": 256, "resampler_depth": 1, "resampler_head_dim": 16}
    return Idefics2Config(
        text_config=text,
        vision_config=vision,
        perceiver_config=perceiver,
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def build_processor(tiny_checkpoint: Path, *, image_splitting: bool) -> Any:
    """An idefics2-8b-style processor around the tiny checkpoint's tokenizer and template."""
    from transformers import AutoProcessor, Idefics2ImageProcessor, Idefics2Processor

    tiny = AutoProcessor.from_pretrained(tiny_checkpoint)
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=image_splitting,
        size={"shortest_edge": 378, "longest_edge": 980},
    )
    return Idefics2Processor(
        image_processor,
        tiny.tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=tiny.chat_template,
    )


def build_model(config: Any, device: str, dtype: torch.dtype, stop_ids: list[int]) -> Any:
    """Random weights, allocated and initialised directly on ``device`` in ``dtype``."""
    from transformers import GenerationConfig, Idefics2ForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=stop_ids, pad_token_id=config.text_config.pad_token_id
    )
    return model.eval()


def parameter_count(config: Any) -> int:
    """Parameters of the model, counted on the meta device (nothing allocated)."""
    from transformers import Idefics2ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def describe(config: Any) -> str:
    text, vision, perceiver = config.text_config, config.vision_config, config.perceiver_config
    return (
        f"text: hidden {text.hidden_size} x {text.num_hidden_layers} layers, "
        f"{text.num_attention_heads} heads ({text.num_key_value_heads} kv), "
        f"intermediate {text.intermediate_size}, vocab {text.vocab_size}, "
        f"rope_theta {text.rope_parameters['rope_theta']}, "
        f"max_position {text.max_position_embeddings}\n"
        f"vision: hidden {vision.hidden_size} x {vision.num_hidden_layers} layers, "
        f"{vision.num_attention_heads} heads, intermediate {vision.intermediate_size}, "
        f"image {vision.image_size}, patch {vision.patch_size}\n"
        f"perceiver: {perceiver.resampler_n_latents} latents, depth {perceiver.resampler_depth}, "
        f"{perceiver.resampler_n_heads} heads x {perceiver.resampler_head_dim}, "
        f"{perceiver.num_key_value_heads} kv heads, hidden {perceiver.hidden_size}"
    )


def run_benchmark(
    gen: Generator, contents: list[_common.Content], batch_sizes: list[int], runs: int
) -> list[dict[str, Any]]:
    reference = _common.Reference(gen, "idefics2")
    convs = [_common.conversation(content) for content in contents]
    baseline: list[list[int]] | None = None
    rows = []
    for size in batch_sizes:

        def sdk(size: int = size) -> list[list[int]]:
            # A cold vision cache each run: the raw side runs the encoder every time.
            gen.clear_vision_cache()
            results = gen.generate_batch(convs, batch_size=size, max_new_tokens=MAX_NEW_TOKENS)
            return [list(result.token_ids) for result in results]

        def raw(size: int = size) -> list[list[int]]:
            chunks = bench_batching.chunks(contents, size)
            return [ids for chunk in chunks for ids in reference.generate(chunk, MAX_NEW_TOKENS)]

        sdk_ids, raw_ids = sdk(), raw()  # also the warm-up
        baseline = baseline if baseline is not None else raw_ids
        # CPU noise matters little next to GPU work: no round is rejected.
        timings = _common.interleaved(
            {"sdk": sdk, "raw": raw}, runs=runs, warmup=0, max_foreign=1.0, patience_s=0
        )
        stats = {side: _common.summary(seconds) for side, seconds in timings.seconds.items()}
        tokens = {"sdk": sum(map(len, sdk_ids)), "raw": sum(map(len, raw_ids))}
        row: dict[str, Any] = {
            "batch_size": size,
            "times": stats,
            "generated_tokens": tokens,
            "tokens_per_s": {
                side: round(tokens[side] / float(stats[side]["median_s"]), 1) for side in stats
            },
            "speedup_sdk_vs_raw": round(
                float(stats["raw"]["median_s"]) / float(stats["sdk"]["median_s"]), 3
            ),
            "differing_outputs": {
                "sdk_vs_raw": sum(a != b for a, b in zip(sdk_ids, raw_ids, strict=True)),
                "sdk_vs_raw_batch_1": sum(a != b for a, b in zip(sdk_ids, baseline, strict=True)),
                "raw_vs_raw_batch_1": sum(a != b for a, b in zip(raw_ids, baseline, strict=True)),
            },
        }
        rows.append(row)
        print(
            f"batch {size}: SDK {stats['sdk']['median_s']:.2f} s "
            f"({row['tokens_per_s']['sdk']} tok/s), raw {stats['raw']['median_s']:.2f} s "
            f"({row['tokens_per_s']['raw']} tok/s)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="build the config and processor, print the parameter count; allocate no weights",
    )
    mode.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the whole benchmark on the CPU with a scaled-down model (numbers meaningless)",
    )
    parser.add_argument("--quick", action="store_true", help="2 timed runs instead of 3")
    parser.add_argument("--runs", type=int, help="timed runs per side and batch size")
    parser.add_argument(
        "--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated"
    )
    parser.add_argument("--count", type=int, default=bench_batching.COUNT, help="conversations")
    parser.add_argument(
        "--image-splitting",
        action="store_true",
        help="split each image into 4 crops + the whole, as idefics2-8b's processor can "
        "(default off, the model card's memory-saving setting)",
    )
    parser.add_argument(
        "--vision-cache-mb",
        type=float,
        default=256.0,
        help="the SDK side's vision cache (default 256, the SDK default; cleared before "
        "every run); 0 turns it off",
    )
    args = parser.parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    runs = args.runs or (2 if args.quick else 3)
    if not (args.dry_run or args.cpu_smoke) and not torch.cuda.is_available():
        sys.exit(
            "bench_gpu_idefics2.py: no CUDA device found. This benchmark needs an NVIDIA GPU "
            "with at least 24 GB of memory (the bf16 model alone is about 17 GB). "
            "On this machine, run it with --dry-run (config and size) or --cpu-smoke "
            "(the whole script with a scaled-down model)."
        )
    _common.configure(threads=torch.get_num_threads() if torch.cuda.is_available() else 2)

    with tempfile.TemporaryDirectory(prefix="idefics-kit-bench-") as tmp:
        tiny = _common.build_checkpoint("idefics2", Path(tmp), size="tiny")
        processor = build_processor(tiny, image_splitting=args.image_splitting)
        tokenizer = processor.tokenizer
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        config = idefics2_8b_config(image_token_id, tokenizer.pad_token_id, smoke=args.cpu_smoke)
        if max(tokenizer.get_vocab().values()) >= config.text_config.vocab_size:
            raise AssertionError("the tokenizer's ids do not fit the model's vocabulary")
        contents = bench_batching.make_contents(args.count)
        print(describe(config))
        params = parameter_count(config)
        print(f"parameters: {params / 1e9:.3f} B ({params * 2 / 1e9:.1f} GB in bf16)")

        if args.dry_run:
            lengths = [
                int(
                    processor.apply_chat_template(
                        _common.chat_messages(content),
                        add_generation_prompt=True,
                        tokenize=True,
                        return_dict=True,
                        return_tensors="pt",
                    )["attention_mask"].sum()
                )
                for content in contents
            ]
            print(
                f"{len(contents)} conversations: prompts of {min(lengths)}-{max(lengths)} "
                f"tokens, {sum(lengths)} in all; batch sizes {batch_sizes}; dry run, no weights "
                "allocated"
            )
            return

        device = "cpu" if args.cpu_smoke else "cuda"
        dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
        eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        start = time.perf_counter()
        model = build_model(config, device, dtype, [tokenizer.eos_token_id, eou])
        print(f"model built on {device} in {time.perf_counter() - start:.1f} s")
        gen = Generator.from_model(model, processor, vision_cache_mb=args.vision_cache_mb)
        rows = run_benchmark(gen, contents, batch_sizes, runs)

    print()
    print(
        f"IDEFICS 2 (idefics2-8b architecture, random {str(dtype).removeprefix('torch.')} "
        f"weights) on {_device_name(device)}: {len(contents)} conversations, "
        f"max_new_tokens={MAX_NEW_TOKENS}, {runs} interleaved runs per side"
    )
    print(
        _common.table(
            ["batch", "SDK s", "raw s", "SDK tok/s", "raw tok/s", "SDK/raw speed", "differ"],
            [
                [
                    r["batch_size"],
                    f"{r['times']['sdk']['median_s']:.2f}",
                    f"{r['times']['raw']['median_s']:.2f}",
                    r["tokens_per_s"]["sdk"],
                    r["tokens_per_s"]["raw"],
                    f"{r['speedup_sdk_vs_raw']:.2f}x",
                    f"{r['differing_outputs']['sdk_vs_raw']}/{len(contents)}",
                ]
                for r in rows
            ],
        )
    )
    if args.cpu_smoke:
        print("\nCPU smoke run: numbers are meaningless and not written")
        return
    path = _common.write_results(
        "gpu_idefics2",
        {
            "settings": {
                "model": "idefics2-8b architecture, random bf16 weights",
                "parameters": params,
                "gpu": _device_name(device),
                "conversations": len(contents),
                "max_new_tokens": MAX_NEW_TOKENS,
                "image_splitting": args.image_splitting,
                "vision_cache_mb": args.vision_cache_mb,
                "runs": runs,
            },
            "batch_sizes": rows,
        },
    )
    print(f"\nwrote {path.relative_to(_common.ROOT)}")


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


if __name__ == "__main__":
    main()
