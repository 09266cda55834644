"""RSS over 1,000 sequential `generate` calls on one Generator (tiny IDEFICS 2, CPU).

Usage: .venv/bin/python benchmarks/bench_sequential_rss.py [--calls 1000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import build_checkpoint, configure, picture, write_results

from idefics_kit import Conversation, Generator


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    configure()
    with tempfile.TemporaryDirectory() as root:
        gen = Generator.from_pretrained(build_checkpoint("idefics2", Path(root), size="tiny"))
        conv = Conversation().user(picture(40, 30, seed=1), "What is in this image?")
        for _ in range(50):
            gen.generate(conv, max_new_tokens=4)
        samples = [(0, rss_mb())]
        for call in range(1, args.calls + 1):
            gen.generate(conv, max_new_tokens=4)
            if call % 250 == 0:
                samples.append((call, rss_mb()))
    print("calls  RSS MB")
    for call, mb in samples:
        print(f"{call:5d}  {mb:7.1f}")
    growth = samples[-1][1] - samples[0][1]
    print(f"growth over {args.calls} calls: {growth:+.1f} MB")
    write_results(
        "sequential_rss",
        {
            "calls": args.calls,
            "rss_mb": [{"calls": c, "mb": round(m, 1)} for c, m in samples],
            "growth_mb": round(growth, 1),
        },
    )


if __name__ == "__main__":
    main()
