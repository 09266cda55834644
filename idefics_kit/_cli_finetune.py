"""``idefics-kit finetune``: fine-tune a model on JSONL rows; the flags and the handler.

The training itself is :func:`idefics_kit.finetune.finetune`; this module maps
flags to its arguments and prints its report (bad rows, progress, eval
results on stderr; a one-line summary on stdout).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from idefics_kit._cli_common import PROG, positive_float, positive_int
from idefics_kit.finetune.defaults import DEFAULTS

__all__ = ["FINETUNE_EPILOG", "add_finetune_command", "run_finetune"]

FINETUNE_EPILOG = f"""\
rows: the 'batch' JSONL format, one conversation per line; the assistant turns
are what the model learns (each up to its end-of-turn token):
  {{"id": "r1", "messages": [
     {{"role": "user", "content": [{{"type": "image", "path": "cat.jpg"}},
                                  {{"type": "text", "text": "What is this?"}}]}},
     {{"role": "assistant", "content": "A cat on a sofa."}}]}}
Bad rows (unreadable, no or empty answer, broken image, too long) are listed,
one line each with the row id and reason, before training starts, and left
out (--strict: stop instead). Rerunning the same command after an
interruption resumes from the last checkpoint.

output: a LoRA adapter folder (loads with --model OUT anywhere, or
Generator.from_pretrained(OUT)); --merge or --full: a full checkpoint folder.

examples:
  {PROG} finetune train.jsonl -o toy-tuned --eval eval.jsonl        # the toy model
  {PROG} finetune --model HuggingFaceTB/SmolVLM-Instruct train.jsonl -o smol-lora \\
      --epochs 2 --batch-size 4 --gradient-accumulation 4
  {PROG} finetune --model HuggingFaceM4/idefics2-8b --qlora part1.jsonl part2.jsonl \\
      -o idefics2-qlora --gradient-checkpointing                        # CUDA GPU
  {PROG} ask --model toy-tuned --image red_circle.png "What color is the shape?"
"""


def add_finetune_command(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``finetune`` on the CLI's subcommands (``parents``: the model flags)."""
    command = commands.add_parser(
        "finetune",
        help="fine-tune a model on JSONL conversations (needs the [train] extra for LoRA)",
        description="Fine-tune an IDEFICS-family model on the assistant turns of JSONL "
        "conversations: LoRA by default, all weights with --full.",
        epilog=FINETUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=parents,
    )
    command.add_argument("train", nargs="+", type=Path, help="training rows (JSONL), one or more")
    command.add_argument(
        "-o", "--output", type=Path, required=True, help="output folder (new, or a run to resume)"
    )
    command.add_argument("--eval", type=Path, help="eval rows (JSONL): loss and exact match")
    training = command.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=positive_float,
        default=DEFAULTS.epochs,
        help=f"passes over the rows (default: {DEFAULTS.epochs:g})",
    )
    training.add_argument(
        "--max-steps",
        type=positive_int,
        metavar="N",
        help="stop after N steps (overrides --epochs)",
    )
    training.add_argument(
        "--learning-rate",
        type=positive_float,
        metavar="LR",
        help="default: 2e-4 for LoRA, 1e-5 with --full (3e-3 / 1e-3 for models under 100M "
        "parameters, such as the toy model)",
    )
    training.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULTS.batch_size,
        metavar="N",
        help=f"rows per step, per device (default: {DEFAULTS.batch_size})",
    )
    training.add_argument(
        "--gradient-accumulation",
        type=positive_int,
        default=DEFAULTS.gradient_accumulation,
        metavar="N",
        help=f"batches per optimizer step (default: {DEFAULTS.gradient_accumulation})",
    )
    training.add_argument(
        "--lora-rank",
        type=positive_int,
        default=DEFAULTS.lora_rank,
        metavar="R",
        help=f"LoRA rank (default: {DEFAULTS.lora_rank}; alpha is 2R)",
    )
    training.add_argument(
        "--full", action="store_true", help="train all language-model weights instead of LoRA"
    )
    training.add_argument(
        "--train-vision", action="store_true", help="also train the vision encoder and connector"
    )
    training.add_argument(
        "--merge", action="store_true", help="write merged weights instead of a LoRA adapter"
    )
    training.add_argument(
        "--qlora",
        action="store_true",
        help="QLoRA: a 4-bit base (bitsandbytes; CUDA GPUs only) under the LoRA adapters",
    )
    training.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help=f"default: {DEFAULTS.seed}"
    )
    training.add_argument(
        "--save-steps",
        type=positive_int,
        default=DEFAULTS.save_steps,
        metavar="N",
        help=f"checkpoint every N steps, to resume from (default: {DEFAULTS.save_steps})",
    )
    training.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, ~30%% slower",
    )
    training.add_argument(
        "--max-length",
        type=positive_int,
        metavar="N",
        help="longest row in tokens, images included (default: the model's context)",
    )
    training.add_argument(
        "--strict", action="store_true", help="stop on any bad row instead of leaving it out"
    )
    command.set_defaults(run=run_finetune)


def run_finetune(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The ``finetune`` command: train, then print a one-line summary."""
    from idefics_kit.finetune.trainer import finetune

    def say(message: str) -> None:
        print(f"{PROG}: {message}", file=err, flush=True)

    result = finetune(
        args.model,
        [str(path) for path in args.train],
        args.output,
        eval=str(args.eval) if args.eval is not None else None,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        lora_rank=args.lora_rank,
        full=args.full,
        train_vision=args.train_vision,
        merge=args.merge,
        quantize="4bit" if args.qlora else None,
        seed=args.seed,
        save_steps=args.save_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        strict=args.strict,
        device=args.device,
        dtype=args.dtype,
        max_length=args.max_length,
        progress=not args.quiet,
        log=(lambda _message: None) if args.quiet else say,
    )
    summary = f"{result.kind} in {result.output}: {result.steps} steps, {result.train_rows} rows"
    if result.left_out:
        summary += f" ({len(result.left_out)} left out)"
    if result.evaluations:
        first, last = result.evaluations[0], result.evaluations[-1]
        summary += (
            f"; eval exact match {100 * first['eval_exact_match']:.1f}% -> "
            f"{100 * last['eval_exact_match']:.1f}%"
        )
    print(summary, file=out)
    return 0
