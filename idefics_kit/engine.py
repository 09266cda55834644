"""The only module that calls ``model.generate``.

It builds the generation arguments from :class:`GenerationOptions` and the
adapter's stop/banned ids, stops rows on stop strings, and turns generated ids
into :class:`Result` values. ``generate`` and ``stream`` share
:func:`finish`, so a stream's pieces always join to ``generate``'s text.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
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

__all__ = ["finish", "generate", "stream"]

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


class _StopStrings(StoppingCriteria):  # type: ignore[misc]
    """Ends a row once its generated text contains a stop string."""

    def __init__(self, adapter: FamilyAdapter, stop: tuple[str, ...], prompt_length: int) -> None:
        self.adapter = adapter
        self.stop = stop
        self.prompt_length = prompt_length
        self.window = max(len(s) for s in stop) + _STOP_WINDOW_SLACK

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window) :].tolist()
        done = [_find_stop(self.adapter.decode(tail), self.stop) is not None for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Cancelled(StoppingCriteria):  # type: ignore[misc]
    """Ends every row once ``event`` is set (a stream closed early)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _SeededSampler(LogitsProcessor):  # type: ignore[misc]
    """Samples every row with a generator of its own, seeded with ``options.seed``."""

    def __init__(self, options: GenerationOptions) -> None:
        assert options.seed is not None
        self.seed = options.seed
        self.warpers: list[Any] = [TemperatureLogitsWarper(options.temperature)]
        if options.top_k is not None:
            self.warpers.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(options.top_p))
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            self.generators = [
                torch.Generator(scores.device).manual_seed(self.seed)
                for _ in range(scores.shape[0])
            ]
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.cat(
            [
                torch.multinomial(row, 1, generator=g)
                for row, g in zip(probs, self.generators, strict=True)
            ]
        )
        chosen = torch.full_like(scores, -float("inf"))
        chosen[torch.arange(scores.shape[0], device=scores.device), picks] = 0.0
        return chosen


def _generate_kwargs(
    adapter: FamilyAdapter, options: GenerationOptions, prompt_length: int
) -> dict[str, Any]:
    # Every decoding setting is passed explicitly so that defaults saved in a
    # checkpoint's generation config (do_sample, temperature, top_k ...) never
    # change what the options say.
    kwargs: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "num_beams": 1,
        "do_sample": not options.greedy,
        "eos_token_id": list(adapter.stop_token_ids),
        "pad_token_id": adapter.pad_token_id,
        "repetition_penalty": options.repetition_penalty,
    }
    if adapter.banned_token_ids:
        kwargs["bad_words_ids"] = [[token] for token in adapter.banned_token_ids]
    if not options.greedy and options.seed is None:
        kwargs["temperature"] = options.temperature
        kwargs["top_p"] = options.top_p
        kwargs["top_k"] = options.top_k or 0
    elif not options.greedy:
        # Seeded sampling draws each row from its own generator and hands the
        # pick to greedy search, so a row's answer does not depend on its batch.
        kwargs["do_sample"] = False
        kwargs["logits_processor"] = LogitsProcessorList([_SeededSampler(options)])
    criteria = []
    if options.stop:
        criteria.append(_StopStrings(adapter, options.stop, prompt_length))
    kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    return kwargs


def generate(
    model: Any, adapter: FamilyAdapter, inputs: Any, options: GenerationOptions
) -> list[Result]:
    """Run one micro-batch (already left-padded, on the model's device)."""
    prompt_length = int(inputs["input_ids"].shape[1])
    kwargs = _generate_kwargs(adapter, options, prompt_length)
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise GenerationError(f"model.generate failed: {type(exc).__name__}: {exc}") from exc
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, generated in enumerate(output[:, prompt_length:].tolist()):
        done = finish(adapter, generated, options.stop)
        results.append(
            Result(
                text=done.text,
                token_ids=done.token_ids,
                finish_reason=done.finish_reason,
                usage=Usage(
                    prompt_tokens=int(prompt_tokens[row]), completion_tokens=len(done.token_ids)
                ),
            )
        )
    return results


class _QueueStreamer(BaseStreamer):  # type: ignore[misc]
    """Hands each new token id to the consumer thread; skips the prompt."""

    def __init__(self, sink: queue.Queue[object]) -> None:
        self.sink = sink
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.sink.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


_DONE = object()


def stream(
    model: Any, adapter: FamilyAdapter, inputs: Any, options: GenerationOptions
) -> Generator[str, None, None]:
    """Yield text pieces of a single conversation as soon as they are final.

    A piece is held back only while it ends in an incomplete character or in
    what could be the start of a stop string. The pieces join to exactly
    ``finish(...).text`` of the same ids.
    """
    prompt_length = int(inputs["input_ids"].shape[1])
    kwargs = _generate_kwargs(adapter, options, prompt_length)
    cancel = threading.Event()
    kwargs["stopping_criteria"].append(_Cancelled(cancel))
    sink: queue.Queue[object] = queue.Queue()
    kwargs["streamer"] = _QueueStreamer(sink)

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, **kwargs)
        except BaseException as exc:  # handed to the consumer, re-raised there
            sink.put(exc)
        finally:
            sink.put(_DONE)

    worker = threading.Thread(target=work, name="idefics-kit-stream", daemon=True)
    worker.start()
    stop_ids = set(adapter.stop_token_ids)
    ids: list[int] = []
    emitted = ""
    ended = False
    try:
        while (item := sink.get()) is not _DONE:
            if isinstance(item, torch.OutOfMemoryError):
                raise item  # as in generate(): callers may retry with less memory
            if isinstance(item, BaseException):
                raise GenerationError(
                    f"model.generate failed: {type(item).__name__}: {item}"
                ) from item
            if ended:
                continue
            assert isinstance(item, list)
            for token in item:
                if token in stop_ids:
                    ended = True
                    break
                ids.append(token)
            safe = _safe_text(adapter.decode(ids), options.stop)
            if safe is None:
                ended = True
            elif len(safe) > len(emitted) and safe.startswith(emitted):
                yield safe[len(emitted) :]
                emitted = safe
        final = finish(adapter, ids, options.stop).text
        if len(final) > len(emitted):
            yield final[len(emitted) :]
    finally:
        cancel.set()
        worker.join()


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
