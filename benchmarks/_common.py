"""Shared helpers of the benchmarks: offline setup, inputs, the raw reference, timing, output.

Import this module before anything that imports transformers: it sets
``HF_HUB_OFFLINE`` (read once, when ``huggingface_hub`` is imported).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.utils import logging as transformers_logging

import idefics_kit
from idefics_kit import Conversation, Generator
from idefics_kit.testing import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 2

# The reference path names its special tokens itself, from the model cards, as
# tests/test_parity.py does; the benchmarks check they match the SDK's ids.
_TILE_TOKENS = ["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
BANNED_TOKENS: dict[str, list[str]] = {
    "idefics": ["<image>", "<fake_token_around_image>"],
    "idefics2": ["<image>", "<fake_token_around_image>"],
    "idefics3": ["<image>", "<fake_token_around_image>", *_TILE_TOKENS],
    "smolvlm": ["<image>", "<fake_token_around_image>", *_TILE_TOKENS],
}

_WORDS = (
    "a the this that is are what where how many which who of in on at to with and or not "
    "image picture photo dog cat bird car tree house red green blue yellow black white circle "
    "square shape color left right center describe question answer story one two three big "
    "small sky water man woman child sitting standing running next under over there here it "
    "they we you document text read write page table number first second last day night city road"
).split()


def configure(threads: int = THREADS) -> None:
    """Pin torch's thread count and silence transformers' progress bars and advice."""
    torch.set_num_threads(threads)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noisy RGB picture (a random model needs varied pixels)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def words(rng: random.Random, count: int) -> str:
    """``count`` words the tiny tokenizers know, as one sentence."""
    return " ".join(rng.choices(_WORDS, k=count))


def build_checkpoint(family: str, root: Path, size: str = "small") -> Path:
    """A random-weight checkpoint of ``family`` under ``root`` (offline, seed 0)."""
    return build_tiny_checkpoint(family, root / f"{family}-{size}", size=size)  # type: ignore[arg-type]


# -- the raw transformers reference --------------------------------------------------------


Content = Sequence[str | Image.Image]
"""One user turn: text and already-decoded images, in order."""


def conversation(content: Content) -> Conversation:
    """The SDK conversation of one user turn."""
    return Conversation().user(*content)


def chat_messages(content: Content) -> list[dict[str, Any]]:
    """The same user turn in transformers' chat-message format."""
    blocks = [
        {"type": "image", "image": part}
        if isinstance(part, Image.Image)
        else {"type": "text", "text": part}
        for part in content
    ]
    return [{"role": "user", "content": blocks}]


def idefics_prompt(content: Content) -> list[str | Image.Image]:
    """The same user turn as the IDEFICS 1 model card's interleaved prompt list."""
    prompt: list[str | Image.Image] = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            prompt.append(f"User: {part}" if index == 0 else part)
        else:
            if index == 0:
                prompt.append("User:")
            prompt.append(part)
    return [*prompt, "<end_of_utterance>", "\nAssistant:"]


class Reference:
    """What a transformers user writes: processor, ``model.generate``, decode.

    Its stop, banned and pad ids are derived here from the checkpoint and the
    token names, and checked against the SDK's so both sides do the same work.
    """

    def __init__(self, gen: Generator, family: str) -> None:
        self.family = family
        self.model = gen.model
        self.processor = gen.processor
        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos)
        stops.append(tokenizer.convert_tokens_to_ids("<end_of_utterance>"))
        self.stop_ids = list(dict.fromkeys(stops))
        self.bad_words_ids = [[tokenizer.convert_tokens_to_ids(t)] for t in BANNED_TOKENS[family]]
        self.pad_token_id = int(tokenizer.pad_token_id)
        if set(self.stop_ids) != set(gen.stop_token_ids):
            raise AssertionError(f"stop ids differ: raw {self.stop_ids}, SDK {gen.stop_token_ids}")
        banned = {ids[0] for ids in self.bad_words_ids}
        if banned != set(gen.banned_token_ids):
            raise AssertionError(f"banned ids differ: raw {banned}, SDK {gen.banned_token_ids}")

    def encode(self, batch: Sequence[Content]) -> Any:
        """Model inputs for one conversation or a left-padded batch of several."""
        if self.family == "idefics":
            prompts = [idefics_prompt(content) for content in batch]
            return self.processor(
                text=prompts if len(prompts) > 1 else prompts[0],
                add_end_of_utterance_token=False,
                padding=len(prompts) > 1,
                padding_side="left",
                return_tensors="pt",
            )
        messages = [chat_messages(content) for content in batch]
        extra: dict[str, Any] = {}
        if len(messages) > 1:
            extra["processor_kwargs"] = {"padding": True, "padding_side": "left"}
        return self.processor.apply_chat_template(
            messages if len(messages) > 1 else messages[0],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **extra,
        )

    def run(self, batch: Sequence[Content], max_new_tokens: int) -> RawRun:
        """Generate for ``batch`` (one call); ids cut at the first stop id, text decoded too."""
        # As the model cards do: inputs to the model's device, pixels in its dtype.
        inputs = self.encode(batch).to(self.model.device, dtype=self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                eos_token_id=self.stop_ids,
                bad_words_ids=self.bad_words_ids,
                pad_token_id=self.pad_token_id,
                max_new_tokens=max_new_tokens,
            )
        width = int(inputs["input_ids"].shape[1])
        answers = [cut_at_stop(row, self.stop_ids) for row in output[:, width:].tolist()]
        # A transformers user wants the text too; the SDK's Result carries it.
        self.processor.batch_decode(answers, skip_special_tokens=True)
        return RawRun(
            answers=answers,
            prompt_tokens=[int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()],
            prompt_width=width,
            steps=int(output.shape[1]) - width,
        )

    def generate(self, batch: Sequence[Content], max_new_tokens: int) -> list[list[int]]:
        """Generated ids of each conversation of ``batch``, cut at the first stop id."""
        return self.run(batch, max_new_tokens).answers


@dataclass(frozen=True)
class RawRun:
    """One raw ``model.generate`` call: answers and how much work it did."""

    answers: list[list[int]]
    prompt_tokens: list[int]
    """Real (unpadded) prompt tokens of each row."""
    prompt_width: int
    """Prompt length after padding: every row is computed at this length."""
    steps: int
    """Decoding steps run (the longest row, stop token included)."""


def cut_at_stop(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """``ids`` up to (without) the first stop id."""
    stops = set(stop_ids)
    for index, token in enumerate(ids):
        if token in stops:
            return list(ids[:index])
    return list(ids)


# -- timing --------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds per run of each side, plus how noisy the machine was meanwhile."""

    seconds: dict[str, list[float]]
    foreign_cpu_share: float
    """Mean share of the CPUs other processes used during the kept rounds."""
    rejected_rounds: int
    """Rounds run again because other processes used the CPUs meanwhile."""


def interleaved(
    sides: Mapping[str, Callable[[], object]],
    runs: int,
    warmup: int = 2,
    max_foreign: float = 0.2,
    patience_s: float = 90.0,
) -> Timings:
    """Time each side ``runs`` times, the sides alternating (A B, B A, A B ...).

    Alternating the order as well as interleaving keeps slow drifts and "who
    runs first" effects off the ratio. On a 2-core machine another process
    stalls torch's two threads far more than its CPU share suggests, so a
    round (all sides once) waits for a quiet moment, and a round during
    which other processes used more than ``max_foreign`` of the CPUs is
    thrown away whole and run again. After ``2 * runs`` rejections or
    ``patience_s`` seconds of waiting, noisy rounds are kept (and the mean
    foreign share says so).
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    shares: list[float] = []
    rejected = 0
    deadline = time.monotonic() + patience_s
    while len(shares) < runs:
        order = names if len(shares) % 2 == 0 else names[::-1]
        patient = rejected < 2 * runs and time.monotonic() < deadline
        if patient:
            wait = min(30.0, deadline - time.monotonic())
            wait_for_quiet(max_wait_s=wait, threshold=max_foreign, window_s=0.5, quiet=True)
        taken: dict[str, float] = {}
        with ForeignLoad() as load:
            for name in order:
                gc.collect()
                start = time.perf_counter()
                sides[name]()
                taken[name] = time.perf_counter() - start
        if load.share > max_foreign and patient:
            rejected += 1
            continue
        shares.append(load.share)
        for name in names:
            seconds[name].append(taken[name])
    return Timings(
        seconds=seconds,
        foreign_cpu_share=round(statistics.mean(shares), 3),
        rejected_rounds=rejected,
    )


@dataclass
class Bracketed:
    """Each side's runs against the reference runs just before and after each of them."""

    seconds: dict[str, list[float]]
    """Seconds per run of each side, the reference included."""
    shares: dict[str, list[float]]
    """Per run of a side: mean seconds of its two bracketing reference runs / its seconds."""
    foreign_cpu_share: float
    rejected_runs: int


def bracketed(
    reference: tuple[str, Callable[[], object]],
    sides: Mapping[str, Callable[[], object]],
    runs: int,
    max_foreign: float = 0.2,
    patience_s: float = 120.0,
) -> Bracketed:
    """Time ``runs`` runs of each side, each between two runs of ``reference``.

    The order is R A R B R A R B ... R: every side run is compared with the
    mean of the reference runs on either side of it, which cancels a slow
    drift of the machine and keeps a side and its reference seconds apart
    (in :func:`interleaved` rounds, long sides run between them). A side run
    during which other processes used more than ``max_foreign`` of the CPUs
    is run again, with its following reference run (at most ``2 * runs``
    times, or for ``patience_s`` seconds).
    """
    ref_name, ref = reference
    names = list(sides)
    seconds: dict[str, list[float]] = {name: [] for name in [ref_name, *names]}
    shares: dict[str, list[float]] = {name: [] for name in names}
    loads: list[float] = []
    rejected = 0
    deadline = time.monotonic() + patience_s

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        gc.collect()
        with ForeignLoad() as load:
            start = time.perf_counter()
            fn()
            taken = time.perf_counter() - start
        return taken, load.share

    before, _ = timed(ref)
    seconds[ref_name].append(before)
    for slot in range(runs * len(names)):
        name = names[slot % len(names)]
        while True:
            taken, load = timed(sides[name])
            after, after_load = timed(ref)
            noisy = max(load, after_load) > max_foreign
            if noisy and rejected < 2 * runs and time.monotonic() < deadline:
                rejected += 1
                before = after
                continue
            break
        loads.append(load)
        seconds[name].append(taken)
        seconds[ref_name].append(after)
        shares[name].append((before + after) / 2 / taken)
        before = after
    return Bracketed(
        seconds=seconds,
        shares=shares,
        foreign_cpu_share=round(statistics.mean(loads), 3) if loads else 0.0,
        rejected_runs=rejected,
    )


class ForeignLoad:
    """Share of the machine's CPU time used by other processes while the block ran.

    Another job on a 2-core machine slows both sides; interleaving keeps the
    ratio fair, and this number says how noisy the absolute times are.
    """

    def __init__(self) -> None:
        self.share = 0.0
        self._start: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as file:
            fields = [int(v) for v in file.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks
        own = sum(os.times()[:2])
        return busy, own, time.perf_counter()

    def __enter__(self) -> ForeignLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, now = self._sample()
        elapsed = (now - self._start[2]) * (os.cpu_count() or 1)
        foreign = (busy - self._start[0]) - (own - self._start[1])
        self.share = round(max(0.0, foreign / elapsed), 3) if elapsed > 0 else 0.0


def wait_for_quiet(
    max_wait_s: float = 180.0, threshold: float = 0.15, window_s: float = 2.0, quiet: bool = False
) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` of the CPUs.

    Returns the foreign share of the last window; a benchmark still runs if
    the machine never quiets down, and says so.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        with ForeignLoad() as load:
            time.sleep(window_s)
        if load.share < threshold or time.monotonic() > deadline:
            if load.share >= threshold and not quiet:
                print(f"note: other processes use {load.share:.0%} of the CPUs; times are noisy")
            return load.share


def summary(seconds: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and count of a list of timings (seconds)."""
    return {
        "median_s": round(statistics.median(seconds), 5),
        "min_s": round(min(seconds), 5),
        "max_s": round(max(seconds), 5),
        "runs": len(seconds),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios (each round ran both sides back to back)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


# -- output ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit, sdk_edited = "unknown", None
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        sdk_edited = bool(_git("status", "--porcelain", "--", "idefics_kit"))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "idefics_kit": idefics_kit.__version__,
        "commit": commit,
        "uncommitted_sdk_changes": sdk_edited,
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def ms(seconds: float) -> str:
    """Seconds as milliseconds, one decimal."""
    return f"{seconds * 1000:.1f}"
