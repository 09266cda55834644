"""The only module that calls ``model.generate``.

One micro-batch is a list of :class:`Row` values, each with options of its
own: the batch runs to the largest ``max_new_tokens`` and each row stops at
its own limit, stop strings, or cancellation; greedy and (seeded) sampled
rows, and rows with different repetition penalties, decode side by side.
Everything per row is computed from that row alone (its own sampling
generator, its own penalty over its own tokens, padding excluded), so a row's
tokens do not depend on what shares its batch.

Results and streams share :func:`finish`, and a streaming row's
:class:`TextDecoder` emits only prefixes of ``finish``'s text, so a stream's
pieces always join to the final text.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from idefics_kit.errors import GenerationError
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions
from idefics_kit.results import FinishReason, Result, Usage

__all__ = ["Finished", "Row", "TextDecoder", "finish", "generate"]

# Rows are checked for stop strings on this many trailing tokens beyond the
# longest stop string: enough for every token to add at least one character
# except the few that decode to nothing.
_STOP_WINDOW_SLACK = 8


@dataclass(frozen=True, slots=True)
class Finished:
    """Generated ids cut at the stop token or stop string, and their text."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason


def finish(adapter: FamilyAdapter, ids: Sequence[int], stop: tuple[str, ...]) -> Finished:
    """Cut ``ids`` at the first stop token, then at the token completing a stop string."""
    stop_ids = set(adapter.stop_token_ids)
    reason: FinishReason = "length"
    kept = list(ids)
    for index, token in enumerate(kept):
        if token in stop_ids:
            kept, reason = kept[:index], "stop"
            break
    text = adapter.decode(kept)
    if stop and _find_stop(text, stop) is not None:
        end = _first_completing_token(adapter, kept, stop)
        kept, reason = kept[:end], "stop"
        text = adapter.decode(kept)
        text = text[: _find_stop(text, stop)]
    return Finished(text=text, token_ids=tuple(kept), finish_reason=reason)


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _first_completing_token(adapter: FamilyAdapter, ids: list[int], stop: tuple[str, ...]) -> int:
    # The decoded prefix only grows with more tokens, so "contains a stop
    # string" is monotone in the prefix length: binary search for the first.
    low, high = 1, len(ids)
    while low < high:
        mid = (low + high) // 2
        if _find_stop(adapter.decode(ids[:mid]), stop) is None:
            low = mid + 1
        else:
            high = mid
    return low


def _never() -> bool:
    return False


@dataclass(slots=True, kw_only=True)
class Row:
    """One conversation of a micro-batch: its options, and its caller's hooks.

    ``on_token`` (streams) gets each generated token id as soon as the step
    that made it ends; ``cancelled`` is polled after every step, and a row
    for which it returns True stops there without touching the others.
    """

    options: GenerationOptions
    on_token: Callable[[int], None] | None = None
    cancelled: Callable[[], bool] = field(default=_never)


class _RowStops(StoppingCriteria):  # type: ignore[misc]
    """Ends each row at its own ``max_new_tokens``, stop strings or cancellation."""

    def __init__(self, adapter: FamilyAdapter, rows: Sequence[Row], prompt_length: int) -> None:
        self.adapter = adapter
        self.rows = rows
        self.prompt_length = prompt_length
        self.finished = [False] * len(rows)
        self.windows = [
            max(len(s) for s in row.options.stop) + _STOP_WINDOW_SLACK if row.options.stop else 0
            for row in rows
        ]

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        made = input_ids.shape[1] - self.prompt_length
        for index, row in enumerate(self.rows):
            if self.finished[index]:
                continue
            options = row.options
            if made >= options.max_new_tokens or row.cancelled():
                self.finished[index] = True
            elif options.stop:
                start = max(self.prompt_length, input_ids.shape[1] - self.windows[index])
                tail = self.adapter.decode(input_ids[index, start:].tolist())
                self.finished[index] = _find_stop(tail, options.stop) is not None
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


class _RowRepetitionPenalty(LogitsProcessor):  # type: ignore[misc]
    """transformers' repetition penalty, per row, over the row's own tokens only.

    transformers' processor takes one penalty for the batch and also counts
    the left padding, which makes a row's answer depend on its batch.
    """

    def __init__(self, rows: Sequence[Row], padding: Sequence[int], device: torch.device) -> None:
        self.penalty = torch.tensor(
            [[row.options.repetition_penalty] for row in rows], device=device
        )
        self.padding = list(padding)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = input_ids.clone()
        for row, pads in enumerate(self.padding):
            if pads:
                # Padding positions repeat the row's first real token: no effect.
                ids[row, :pads] = input_ids[row, pads]
        picked = torch.gather(scores, 1, ids)
        penalty = self.penalty.to(picked.dtype)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        return scores.scatter(1, ids, picked)


class _RowSampler(LogitsProcessor):  # type: ignore[misc]
    """Samples each sampling row with its own generator; greedy rows pass through.

    A sampled row's scores become 0 for the pick and -inf elsewhere, so the
    greedy search that ``generate`` runs takes it. A row with a ``seed``
    always draws the same numbers, whatever else is in the batch.
    """

    def __init__(self, rows: Sequence[Row], device: torch.device) -> None:
        self.samplers: list[tuple[int, list[Any], torch.Generator]] = []
        for index, row in enumerate(rows):
            options = row.options
            if options.greedy:
                continue
            warpers: list[Any] = [TemperatureLogitsWarper(options.temperature)]
            if options.top_k is not None:
                warpers.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                warpers.append(TopPLogitsWarper(options.top_p))
            seed = options.seed if options.seed is not None else secrets.randbits(63)
            self.samplers.append((index, warpers, torch.Generator(device).manual_seed(seed)))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for index, warpers, generator in self.samplers:
            row = scores[index : index + 1]
            for warper in warpers:
                row = warper(input_ids[index : index + 1], row)
            probs = torch.softmax(row.float(), dim=-1)
            pick = torch.multinomial(probs[0], 1, generator=generator)
            out[index] = -float("inf")
            out[index, pick] = 0.0
        return out


class _RowStreamer(BaseStreamer):  # type: ignore[misc]
    """Hands each streaming row its new token ids; skips the prompt and finished rows."""

    def __init__(self, rows: Sequence[Row], stops: _RowStops, stop_ids: set[int]) -> None:
        self.sinks = [row.on_token for row in rows]
        self.stops = stops
        self.stop_ids = stop_ids
        self.ended = [sink is None for sink in self.sinks]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for index, token in enumerate(value.reshape(-1).tolist()):
            # Rows that ended on an earlier step only get padding from now on.
            if self.ended[index] or self.stops.finished[index]:
                continue
            sink = self.sinks[index]
            assert sink is not None
            sink(token)
            self.ended[index] = token in self.stop_ids

    def end(self) -> None:
        pass


def _generate_kwargs(
    adapter: FamilyAdapter, rows: Sequence[Row], inputs: Any
) -> tuple[dict[str, Any], _RowStops]:
    # Every decoding setting is passed explicitly so that defaults saved in a
    # checkpoint's generation config (do_sample, temperature, top_k,
    # repetition_penalty ...) never change what the options say. Sampling is
    # done per row by _RowSampler, so generate() itself always runs greedy.
    prompt_length = int(inputs["input_ids"].shape[1])
    device = inputs["input_ids"].device
    kwargs: dict[str, Any] = {
        "max_new_tokens": max(row.options.max_new_tokens for row in rows),
        "num_beams": 1,
        "do_sample": False,
        "eos_token_id": list(adapter.stop_token_ids),
        "pad_token_id": adapter.pad_token_id,
        "repetition_penalty": 1.0,
    }
    if adapter.banned_token_ids:
        kwargs["bad_words_ids"] = [[token] for token in adapter.banned_token_ids]
    processors: list[Any] = []
    if any(row.options.repetition_penalty != 1.0 for row in rows):
        padding = (prompt_length - inputs["attention_mask"].sum(dim=1)).tolist()
        processors.append(_RowRepetitionPenalty(rows, padding, device))
    if any(not row.options.greedy for row in rows):
        processors.append(_RowSampler(rows, device))
    kwargs["logits_processor"] = LogitsProcessorList(processors)
    stops = _RowStops(adapter, rows, prompt_length)
    kwargs["stopping_criteria"] = StoppingCriteriaList([stops])
    if any(row.on_token is not None for row in rows):
        kwargs["streamer"] = _RowStreamer(rows, stops, set(adapter.stop_token_ids))
    return kwargs, stops


def generate(model: Any, adapter: FamilyAdapter, inputs: Any, rows: Sequence[Row]) -> list[Result]:
    """Run one micro-batch (already left-padded, on the model's device); a Result per row."""
    if len(rows) != int(inputs["input_ids"].shape[0]):
        raise ValueError(f"{len(rows)} rows for a batch of {inputs['input_ids'].shape[0]}")
    kwargs, _ = _generate_kwargs(adapter, rows, inputs)
    prompt_length = int(inputs["input_ids"].shape[1])
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise GenerationError(f"model.generate failed: {type(exc).__name__}: {exc}") from exc
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for index, (row, generated) in enumerate(
        zip(rows, output[:, prompt_length:].tolist(), strict=True)
    ):
        # Past its own limit a row holds only what other rows' steps padded in.
        done = finish(adapter, generated[: row.options.max_new_tokens], row.options.stop)
        results.append(
            Result(
                text=done.text,
                token_ids=done.token_ids,
                finish_reason=done.finish_reason,
                usage=Usage(
                    prompt_tokens=int(prompt_tokens[index]),
                    completion_tokens=len(done.token_ids),
                ),
            )
        )
    return results


class TextDecoder:
    """Turns one row's token ids, as they arrive, into text pieces that are final.

    A piece is held back only while it ends in an incomplete character or in
    what could be the start of a stop string. The pieces, followed by
    :meth:`rest` of the final result, join to exactly ``finish(...).text``.
    """

    def __init__(self, adapter: FamilyAdapter, options: GenerationOptions) -> None:
        self.adapter = adapter
        self.stop = options.stop
        self.limit = options.max_new_tokens
        self.stop_ids = set(adapter.stop_token_ids)
        self.ids: list[int] = []
        self.emitted = ""
        self.ended = False

    def feed(self, tokens: Sequence[int]) -> str:
        """The new final text after ``tokens`` ("" when nothing new is final yet)."""
        if self.ended:
            return ""
        for token in tokens:
            if token in self.stop_ids or len(self.ids) >= self.limit:
                self.ended = True
                break
            self.ids.append(token)
        safe = _safe_text(self.adapter.decode(self.ids), self.stop)
        if safe is None:
            self.ended = True
            return ""
        if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
            piece, self.emitted = safe[len(self.emitted) :], safe
            return piece
        return ""

    def rest(self, final_text: str) -> str:
        """What remains of ``final_text`` after the pieces already emitted."""
        return final_text[len(self.emitted) :] if len(final_text) > len(self.emitted) else ""


def _safe_text(text: str, stop: tuple[str, ...]) -> str | None:
    """The part of ``text`` that can no longer change; None once a stop string matched."""
    if stop and _find_stop(text, stop) is not None:
        return None
    # Byte-level tokenizers decode half a UTF-8 character as U+FFFD.
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:size]):
                hold = size
                break
    return text[: len(text) - hold]
