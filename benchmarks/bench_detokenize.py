"""Benchmark 9: a stream's decoding cost per token, whole-answer decoder vs incremental.

Usage: .venv/bin/python benchmarks/bench_detokenize.py [--quick] [--runs N]

For each tiny checkpoint's tokenizer (the four families, plus Llama 2's byte
fallback) an answer of 64, 512 and 4,096 tokens (text with multibyte
characters, so byte runs and characters split across tokens occur) is fed one
token at a time to the stream decoder before issue 19, which decodes the whole
answer at every token (tests/_reference_decoder.py), and to
``idefics_kit.detokenize.TextDecoder``, with two stop strings that never match.
Both must emit the same pieces. Printed: microseconds per token for each, their
ratio, and the token ids each passes to ``decode`` per token (the tokenizer
work, independent of the machine). No model runs: this is the cost on the
consumer's thread (or the event loop, for ``astream``) per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from _common import ROOT, configure, interleaved, paired_ratio, summary, table, write_results

sys.path.insert(0, str(ROOT))  # the reference decoder lives with the tests

from transformers import AutoConfig, AutoProcessor, GenerationConfig

from idefics_kit import testing
from idefics_kit.detokenize import TextDecoder
from idefics_kit.families import adapter_for
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions
from tests._reference_decoder import ReferenceTextDecoder

LENGTHS = (64, 512, 4096)
STOP = ("\n\nUser:", "###")
_WORDS = "a the dog cat is red blue on under big small picture of and with there".split()
_EXTRA = ["é", "€", "中文", "😀", "Zürich", "—", "\n"]


def adapters(root: Path) -> dict[str, FamilyAdapter]:
    found: dict[str, FamilyAdapter] = {}
    paths = {f: testing.build_tiny_checkpoint(f, root / f) for f in get_args(testing.TinyFamily)}
    # Llama 2's tokenizer (idefics-9b, idefics2-8b): <0xNN> byte pieces.
    original = testing._TOKENIZER_SPECS["idefics2"]
    testing._TOKENIZER_SPECS["idefics2"] = dataclasses.replace(original, byte_fallback=True)
    try:
        paths["byte-fallback"] = testing.build_tiny_checkpoint("idefics2", root / "bf")
    finally:
        testing._TOKENIZER_SPECS["idefics2"] = original
    for name, path in paths.items():
        config = AutoConfig.from_pretrained(path)
        cls = adapter_for(config.model_type)
        assert cls is not None
        found[name] = cls(
            AutoProcessor.from_pretrained(path), GenerationConfig.from_pretrained(path)
        )
    return found


def answer(adapter: FamilyAdapter, length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    parts = [
        rng.choice(_EXTRA) if rng.random() < 0.1 else rng.choice(_WORDS) for _ in range(length)
    ]
    ids = adapter.tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]
    ids = [t for t in ids if t not in adapter.stop_token_ids][:length]
    assert len(ids) == length, (len(ids), length)
    return ids


class Counted:
    """``adapter.decode`` that counts the ids it is given."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        self.decode = adapter.decode
        self.ids = 0

    def __call__(self, ids: Sequence[int]) -> str:
        self.ids += len(ids)
        return self.decode(ids)


def stream(decoder_cls: Callable[..., Any], adapter: FamilyAdapter, ids: list[int]) -> list[str]:
    decoder = decoder_cls(adapter, GenerationOptions(max_new_tokens=len(ids), stop=STOP))
    return [decoder.feed((token,)) for token in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs, lengths 64 and 512")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    configure()
    runs = 3 if args.quick else args.runs
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        loaded = adapters(Path(tmp))
        for name, adapter in loaded.items():
            for length in lengths:
                ids = answer(adapter, length)
                pieces = stream(TextDecoder, adapter, ids)
                assert pieces == stream(ReferenceTextDecoder, adapter, ids), (name, length)
                assert adapter.decode(ids).startswith("".join(pieces))
                work = {}
                for side, cls in (("old", ReferenceTextDecoder), ("new", TextDecoder)):
                    counted = Counted(adapter)
                    adapter.decode = counted  # type: ignore[method-assign]
                    try:
                        stream(cls, adapter, ids)
                    finally:
                        del adapter.decode
                    work[side] = counted.ids / length
                timings = interleaved(
                    {
                        "old": lambda a=adapter, i=ids: stream(ReferenceTextDecoder, a, i),
                        "new": lambda a=adapter, i=ids: stream(TextDecoder, a, i),
                    },
                    runs=runs,
                    warmup=1,
                    patience_s=10.0,
                )
                old_us = summary(timings.seconds["old"])["median_s"] / length * 1e6
                new_us = summary(timings.seconds["new"])["median_s"] / length * 1e6
                ratio = paired_ratio(timings.seconds["old"], timings.seconds["new"])
                rows.append(
                    [
                        name,
                        length,
                        f"{old_us:.1f}",
                        f"{new_us:.1f}",
                        f"{ratio:.1f}x",
                        f"{work['old']:.0f}",
                        f"{work['new']:.2f}",
                    ]
                )
                results.append(
                    {
                        "tokenizer": name,
                        "answer_tokens": length,
                        "old_us_per_token": round(old_us, 2),
                        "new_us_per_token": round(new_us, 2),
                        "old_over_new": round(ratio, 2),
                        "old_ids_decoded_per_token": round(work["old"], 2),
                        "new_ids_decoded_per_token": round(work["new"], 3),
                        "old": summary(timings.seconds["old"]),
                        "new": summary(timings.seconds["new"]),
                        "foreign_cpu_share": timings.foreign_cpu_share,
                    }
                )
    print(
        table(
            [
                "tokenizer",
                "tokens",
                "old us/token",
                "new us/token",
                "old/new",
                "old ids/token",
                "new ids/token",
            ],
            rows,
        )
    )
    path = write_results("detokenize" + ("_quick" if args.quick else ""), {"results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
