"""Draw docs/performance.png from benchmarks/results/*.json, with Pillow only.

One panel per benchmark that has results: horizontal bars, each labelled with
its value, with dashed lines at parity and at the target.

    .venv/bin/python benchmarks/plot.py [--out docs/performance.png]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WIDTH = 1100
MARGIN = 30
LABEL_WIDTH = 340
BAR_HEIGHT = 24
BAR_GAP = 8
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GREY = (120, 120, 120)
GOOD = (46, 139, 87)
BAD = (200, 60, 50)
NEUTRAL = (70, 110, 180)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass
class Bar:
    label: str
    value: float
    text: str
    color: tuple[int, int, int] = NEUTRAL


@dataclass
class Panel:
    title: str
    note: str
    bars: list[Bar]
    lines: list[tuple[float, str]] = field(default_factory=list)
    """Dashed vertical lines: (value, label)."""
    scale: float | None = None
    """Value at the right end of the axis (default: the largest value plus a margin)."""
    origin: float = 0.0
    """Value where the bars start; not 0 zooms in on values close to 1."""


def font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


SDK_SIDES = {"sdk": "default", "sdk_no_cache": "cache off"}


def overhead_panel(data: dict[str, Any]) -> Panel:
    target = float(data["settings"]["target_ratio"])
    bars = []
    for row in data["families"]:
        for side, name in SDK_SIDES.items():
            ratio = float(row["ratio_of_medians"][side])
            bars.append(
                Bar(
                    f"{row['family']}, {name}",
                    ratio,
                    f"{ratio:.3f}  ({row[side]['median_s'] * 1000:.0f} vs "
                    f"{row['raw']['median_s'] * 1000:.0f} ms)",
                    GOOD if ratio <= target else BAD,
                )
            )
    settings = data["settings"]
    return Panel(
        title="1. Overhead: SDK time / raw transformers time (lower is better)",
        note=f"gen.generate vs processor + model.generate, 1 image, "
        f"{settings['max_new_tokens']} new tokens, median of {settings['runs']} interleaved "
        "runs, small checkpoints, 2-core CPU",
        bars=bars,
        lines=[(1.0, "parity"), (target, f"target {target}")],
        scale=1.1,
        origin=0.9,
    )


def batching_panel(data: dict[str, Any]) -> Panel:
    target = float(data["settings"]["target_speedup_vs_raw_batched"])
    bars = []
    for row in data["families"]:
        for baseline, key in (
            ("raw batched", "speedup_vs_raw_batched"),
            ("raw singles", "speedup_vs_raw_singles"),
        ):
            for side, name in SDK_SIDES.items():
                speedup = float(row[key][side])
                color = NEUTRAL
                if baseline == "raw batched":
                    color = GOOD if speedup >= target else BAD
                bars.append(
                    Bar(
                        f"{row['family']}, {name}, vs {baseline}", speedup, f"{speedup:.2f}x", color
                    )
                )
    settings = data["settings"]
    return Panel(
        title="2. Batching: speed-up of gen.generate_batch (higher is better)",
        note=f"{settings['conversations']} mixed conversations, batch_size "
        f"{settings['batch_size']}, {settings['max_new_tokens']} new tokens, median of "
        f"{settings['runs']} interleaved runs, small checkpoints, 2-core CPU",
        bars=bars,
        lines=[(1.0, "parity"), (target, f"target {target}x vs raw batched")],
    )


def vision_cache_panel(data: dict[str, Any]) -> Panel:
    bars = []
    for row in data["families"]:
        for mode in ("8 x generate", "generate_batch(8)"):
            result = row[mode]
            speedup = float(result["speedup"])
            noisy = result["foreign_cpu_share"] > 0.2
            text = (
                f"{speedup:.2f}x  (encoder {result['encoder_share_without_cache']:.0%} of "
                f"the run; calls {result['encoder_calls_without_cache']} -> "
                f"{result['encoder_calls_with_cache']})"
            )
            if noisy:
                text = f"{speedup:.2f}x  unreliable: other jobs used "
                text += f"{result['foreign_cpu_share']:.0%} of the CPUs"
            bars.append(Bar(f"{row['family']}, {mode}", speedup, text, GREY if noisy else NEUTRAL))
    return Panel(
        title="3. Vision cache: 8 questions about one image, cache on vs off (higher is better)",
        note="speed-up = time without cache / time with it (cache cleared before each run), "
        f"paired median of {data['settings']['runs']} runs, small checkpoints, 2-core CPU",
        bars=bars,
        lines=[(1.0, "parity")],
    )


def memory_panel(data: dict[str, Any]) -> Panel:
    bars = [
        Bar(f"after {s['results']} results", s["VmRSS"], f"{s['VmRSS']:.0f} MB")
        for s in data["samples"]
    ]
    first, last = data["samples"][0], data["samples"][-1]
    return Panel(
        title="4. Memory: resident set size during gen.iter_batch (flat is good)",
        note=f"{data['settings']['conversations']} conversations from "
        f"{data['settings']['distinct_png_files']} PNG files, tiny idefics2; VmRSS grew "
        f"{data['rss_growth_mb']:+.1f} MB from {first['results']} to {last['results']} results "
        f"(peak VmHWM {last['VmHWM']:.0f} MB)",
        bars=bars,
    )


def gpu_panel(data: dict[str, Any]) -> Panel:
    bars = [
        Bar(
            f"batch {row['batch_size']}",
            row["speedup_sdk_vs_raw"],
            f"{row['speedup_sdk_vs_raw']:.2f}x  ({row['tokens_per_s']['sdk']:.0f} vs "
            f"{row['tokens_per_s']['raw']:.0f} tok/s)",
        )
        for row in data["batch_sizes"]
    ]
    return Panel(
        title="5. GPU, idefics2-8b architecture: SDK tokens/s / raw tokens/s",
        note=f"{data['settings']['gpu']}, random bf16 weights, "
        f"{data['settings']['conversations']} conversations",
        bars=bars,
        lines=[(1.0, "parity")],
    )


def draw_panel(draw: ImageDraw.ImageDraw, top: int, panel: Panel) -> int:
    title, small, tiny = font(20), font(15), font(13)
    draw.text((MARGIN, top), panel.title, font=title, fill=INK)
    draw.text((MARGIN, top + 28), panel.note, font=tiny, fill=GREY)
    top += 56
    if not panel.bars:
        return top + 10
    # The longest value text must fit to the right of the longest bar.
    longest_text = max(draw.textlength(bar.text, font=small) for bar in panel.bars)
    left, right = MARGIN + LABEL_WIDTH, WIDTH - MARGIN - max(120, round(longest_text) + 16)
    largest = max([bar.value for bar in panel.bars] + [v for v, _ in panel.lines])
    scale = panel.scale or largest * 1.08
    origin = panel.origin

    def x(value: float) -> int:
        share = (min(max(value, origin), scale) - origin) / (scale - origin)
        return left + round((right - left) * share)

    height = len(panel.bars) * (BAR_HEIGHT + BAR_GAP)
    # Reference lines first, so that bars and their values are drawn over them;
    # labels of neighbouring lines go on alternate rows so they never overlap.
    for row, (value, label) in enumerate(sorted(panel.lines)):
        for y in range(top - 4, top + height, 8):
            draw.line([x(value), y, x(value), y + 4], fill=GREY, width=1)
        draw.text(
            (x(value), top + height + 2 + 15 * (row % 2)), label, font=tiny, fill=GREY, anchor="ma"
        )
    for index, bar in enumerate(panel.bars):
        y = top + index * (BAR_HEIGHT + BAR_GAP)
        draw.text((left - 10, y + BAR_HEIGHT // 2), bar.label, font=small, fill=INK, anchor="rm")
        draw.rectangle([left, y, max(left + 1, x(bar.value)), y + BAR_HEIGHT], fill=bar.color)
        where = (x(bar.value) + 8, y + BAR_HEIGHT // 2)
        box = draw.textbbox(where, bar.text, font=small, anchor="lm")
        draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=BACKGROUND)
        draw.text(where, bar.text, font=small, fill=INK, anchor="lm")
    draw.line([left, top - 4, left, top + height], fill=INK, width=1)
    draw.text((left, top + height + 2), f"{origin:g}", font=tiny, fill=GREY, anchor="ma")
    return top + height + 52


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.png")
    args = parser.parse_args()
    panels = []
    builders = {
        "overhead": overhead_panel,
        "batching": batching_panel,
        "vision_cache": vision_cache_panel,
        "memory": memory_panel,
        "gpu_idefics2": gpu_panel,
    }
    pending = {
        "vision_cache": Panel(
            "3. Vision cache: pending",
            "no results yet: run benchmarks/bench_vision_cache.py",
            [],
        ),
        "gpu_idefics2": Panel(
            "5. GPU (idefics2-8b architecture): not run",
            "no GPU was available; run benchmarks/bench_gpu_idefics2.py on one",
            [],
        ),
    }
    for name, build in builders.items():
        data = load(name)
        if data is not None:
            panels.append(build(data))
        elif name in pending:
            panels.append(pending[name])
    if not panels:
        raise SystemExit(f"no results in {RESULTS}; run the benchmarks first")

    heights = [56 + (len(p.bars) * (BAR_HEIGHT + BAR_GAP) + 52 if p.bars else 10) for p in panels]
    image = Image.new("RGB", (WIDTH, MARGIN * 2 + 40 + sum(heights)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), "idefics_kit benchmarks", font=font(24), fill=INK)
    top = MARGIN + 40
    for panel in panels:
        top = draw_panel(draw, top, panel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
