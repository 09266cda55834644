"""Benchmark 7: cost of structured output and of scoring.

1. Constraint cost per decoding step, every family, on its "small"
   random-weight checkpoint: the same conversation(s) answered unconstrained
   and constrained to a JSON Schema (an array of 16 digits, so every answer is
   about 35-50 tokens), sides interleaved in the same run. Both are greedy; the
   cost is wall time divided by decoding steps (a batch runs as many steps as
   its longest row, stop token included). Target: constrained / free <= 1.15.
2. ``score`` over 4 choices (prompt once, KV cache reused, choices batched)
   against 4 separate reference forward passes of prompt + choice through
   plain transformers, and against one batched forward pass of the 4 rows
   prompt + choice (the design not taken). The vision cache is cleared before
   each ``score`` so the image is encoded every time, as the reference does.
3. Grammar engines on one synthetic 32,000-token vocabulary: compile time of a
   nested JSON Schema and the time to compute one next-token mask along a
   valid answer, xgrammar against outlines-core.
4. With ``--toy``: accuracy of ``score`` (4 colours / 3 shapes as choices) and
   of ``choice=`` generation on 200 held-out colour and shape questions.

    .venv/bin/python benchmarks/bench_structured.py [--quick] [--runs N] [--toy]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # before idefics_kit: sets HF_HUB_OFFLINE before transformers loads
import torch

from idefics_kit import GenerationOptions, Generator, Result

FAMILIES = ("idefics", "idefics2", "idefics3", "smolvlm")
TARGET_RATIO = 1.15
DIGITS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 16,
    "maxItems": 16,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string"}, "ok": {"type": "boolean"}},
            "required": ["zip", "ok"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
CHOICES = ["red", "a blue circle", "the green square on the left", "yellow"]


def steps(results: list[Result]) -> int:
    return max(r.usage.completion_tokens + (r.finish_reason == "stop") for r in results)


def bench_constraint(family: str, root: Path, runs: int, batch: int) -> dict[str, Any]:
    gen = Generator.from_pretrained(_common.build_checkpoint(family, root), device="cpu")
    rng = random.Random(batch)
    convs = [
        _common.conversation([_common.words(rng, 6), _common.picture(64, 48, seed=i)])
        for i in range(batch)
    ]
    free = GenerationOptions(max_new_tokens=48)
    constrained = GenerationOptions(max_new_tokens=96, json_schema=DIGITS)
    counted: dict[str, int] = {}

    def side(name: str, options: GenerationOptions) -> Any:
        def run() -> None:
            results = gen.generate_batch(convs, options, batch_size=batch)
            counted[name] = steps(results)

        return run

    timings = _common.interleaved(
        {"free": side("free", free), "json": side("json", constrained)}, runs
    )
    per_step = {
        name: [s / counted[name] for s in timings.seconds[name]] for name in timings.seconds
    }
    ratio = _common.paired_ratio(per_step["json"], per_step["free"])
    answers = gen.generate_batch(convs, constrained)
    valid = all(r.finish_reason == "stop" and len(json.loads(r.text)) == 16 for r in answers)
    gen.close()
    return {
        "family": family,
        "batch": batch,
        "free_steps": counted["free"],
        "json_steps": counted["json"],
        "free_ms_per_step": round(1000 * statistics.median(per_step["free"]), 3),
        "json_ms_per_step": round(1000 * statistics.median(per_step["json"]), 3),
        "ratio": round(ratio, 3),
        "all_valid": valid,
        "foreign_cpu_share": timings.foreign_cpu_share,
    }


def reference_inputs(gen: Generator, conv: Any, ids: list[int]) -> dict[str, Any]:
    adapter = gen._adapter
    images = [part.load() for part in conv.images()]
    inputs = dict(adapter.encode([conv], [images]))
    count = len(ids)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    mask = inputs["attention_mask"]
    full["attention_mask"] = torch.cat([mask, torch.ones(1, count, dtype=mask.dtype)], dim=1)
    if "image_attention_mask" in inputs:
        image_mask = inputs["image_attention_mask"]
        full["image_attention_mask"] = torch.cat(
            [image_mask, image_mask[:, -1:].expand(1, count, -1)], dim=1
        )
    return full


def bench_score(family: str, root: Path, runs: int) -> dict[str, Any]:
    from idefics_kit.batching import collate
    from idefics_kit.scoring import choice_token_ids

    gen = Generator.from_pretrained(_common.build_checkpoint(family, root), device="cpu")
    conv = _common.conversation(["What is in this image?", _common.picture(64, 48, seed=3)])
    ids = [list(choice_token_ids(gen._adapter, c)) for c in CHOICES]

    def score() -> None:
        gen.clear_vision_cache()
        gen.score(conv, CHOICES)

    def reference() -> None:
        for choice_ids in ids:
            with torch.inference_mode():
                gen.model(**reference_inputs(gen, conv, choice_ids))

    def batched_full() -> None:
        rows = [reference_inputs(gen, conv, choice_ids) for choice_ids in ids]
        # Right padding: pad id, mask 0, image mask 0 (padding_side of collate is left;
        # left padding is exact too, with position ids from the mask).
        inputs = collate(rows, gen._adapter.sequence_keys)
        with torch.inference_mode():
            gen.model(**inputs)

    timings = _common.interleaved(
        {"score": score, "reference_x4": reference, "batched_full": batched_full}, runs
    )
    gen.close()
    return {
        "family": family,
        "choices": len(CHOICES),
        "choice_tokens": [len(i) for i in ids],
        "score_ms": round(1000 * statistics.median(timings.seconds["score"]), 2),
        "reference_x4_ms": round(1000 * statistics.median(timings.seconds["reference_x4"]), 2),
        "batched_full_ms": round(1000 * statistics.median(timings.seconds["batched_full"]), 2),
        "speedup_vs_reference": round(
            _common.paired_ratio(timings.seconds["reference_x4"], timings.seconds["score"]), 2
        ),
        "speedup_vs_batched_full": round(
            _common.paired_ratio(timings.seconds["batched_full"], timings.seconds["score"]), 2
        ),
        "foreign_cpu_share": timings.foreign_cpu_share,
    }


def synthetic_vocab(size: int) -> list[str]:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;\"'{}[]"
    vocab = dict.fromkeys(chr(c) for c in range(0x20, 0x7F))
    while len(vocab) < size - 1:
        vocab[" " * rng.randint(0, 1) + "".join(rng.choices(alphabet, k=rng.randint(2, 8)))] = None
    return list(vocab)


ANSWER = (
    '{"name": "Ada Lovelace", "age": 36, "tags": ["a", "b"], "address": {"zip": "N1", "ok": true}}'
)


def greedy_path(vocab: list[str], text: str) -> list[int]:
    index = {t: i for i, t in enumerate(vocab)}
    ids, position = [], 0
    while position < len(text):
        for size in range(8, 0, -1):
            piece = text[position : position + size]
            if piece in index:
                ids.append(index[piece])
                position += size
                break
    return ids


def bench_engines(size: int) -> dict[str, Any]:
    vocab = synthetic_vocab(size)
    eos = len(vocab)
    path = greedy_path(vocab, ANSWER)
    out: dict[str, Any] = {"vocab_size": size, "answer_tokens": len(path)}
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo([*vocab, ""], xgr.VocabType.RAW, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out["xgrammar_vocab_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(PERSON), any_whitespace=False)
    out["xgrammar_compile_s"] = round(time.perf_counter() - started, 4)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, size)
    started = time.perf_counter()
    for token in path:
        matcher.fill_next_token_bitmask(bitmask)
        assert matcher.accept_token(token)
    out["xgrammar_mask_us"] = round(1e6 * (time.perf_counter() - started) / len(path), 1)
    try:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return out
    started = time.perf_counter()
    vocabulary = oc.Vocabulary(eos, {t: [i] for i, t in enumerate(vocab)})
    out["outlines_vocab_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(PERSON), r"[ ]?")
    index = oc.Index(regex, vocabulary)
    out["outlines_compile_s"] = round(time.perf_counter() - started, 4)
    guide = oc.Guide(index)
    mask = torch.zeros((size + 31) // 32, dtype=torch.int32)
    started = time.perf_counter()
    for token in path:
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        guide.advance(token)
    out["outlines_mask_us"] = round(1e6 * (time.perf_counter() - started) / len(path), 1)
    return out


def bench_toy() -> dict[str, Any]:
    from idefics_kit.toy.heldout import held_out
    from idefics_kit.toy.scenes import COLORS, SHAPES

    gen = Generator.from_pretrained("toy", device="cpu")
    questions = [q for q in held_out(4242, 100) if q.category in ("color", "shape")]
    right = 0
    for question in questions:
        choices = list(COLORS if question.category == "color" else SHAPES)
        scores = gen.score(question.conversation, choices)
        right += max(scores, key=lambda s: s.logprob).choice == question.expected
    constrained = 0
    for category, choices in (("color", COLORS), ("shape", SHAPES)):
        subset = [q for q in questions if q.category == category]
        answers = gen.generate_batch(
            [q.conversation for q in subset], choice=list(choices), max_new_tokens=4
        )
        constrained += sum(a.text == q.expected for a, q in zip(answers, subset, strict=True))
    gen.close()
    return {
        "questions": len(questions),
        "held_out_seed": 4242,
        "score_accuracy": right / len(questions),
        "choice_accuracy": constrained / len(questions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, two families")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--toy", action="store_true", help="also measure the toy model")
    args = parser.parse_args()
    _common.configure()
    runs = args.runs or (3 if args.quick else 7)
    families = ("idefics2", "idefics3") if args.quick else FAMILIES
    payload: dict[str, Any] = {"target_ratio": TARGET_RATIO}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        payload["constraint"] = []
        for family in families:
            for batch in (1, 4):
                payload["constraint"].append(bench_constraint(family, root, runs, batch))
                print(payload["constraint"][-1], flush=True)
        print(
            _common.table(
                ["family", "batch", "free ms/step", "json ms/step", "ratio", "valid"],
                [
                    [
                        r["family"],
                        r["batch"],
                        r["free_ms_per_step"],
                        r["json_ms_per_step"],
                        r["ratio"],
                        r["all_valid"],
                    ]
                    for r in payload["constraint"]
                ],
            )
        )
        payload["score"] = [bench_score(f, root, runs) for f in families]
        print(
            _common.table(
                ["family", "score ms", "4 ref passes ms", "batched full ms", "x ref", "x full"],
                [
                    [
                        r["family"],
                        r["score_ms"],
                        r["reference_x4_ms"],
                        r["batched_full_ms"],
                        r["speedup_vs_reference"],
                        r["speedup_vs_batched_full"],
                    ]
                    for r in payload["score"]
                ],
            )
        )
    payload["engines"] = bench_engines(32000)
    print(json.dumps(payload["engines"]))
    if args.toy:
        payload["toy"] = bench_toy()
        print(json.dumps(payload["toy"]))
    print(_common.write_results("structured", payload))


if __name__ == "__main__":
    main()
