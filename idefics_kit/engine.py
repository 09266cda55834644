"""The only module that calls ``model.generate``.

One micro-batch is a list of :class:`Row` values, each with options of its
own: the batch runs to the largest ``max_new_tokens`` and each row stops at
its own limit, stop strings, or cancellation; greedy and (seeded) sampled
rows, and rows with different repetition penalties, decode side by side.
Everything per row is computed from that row alone (its own sampling
generator, its own penalty over its own tokens, padding excluded), so a row's
tokens do not depend on what shares its batch.

Logits processors run in this order: the log-probability capture (raw
scores), the ban on image tokens, each row's grammar constraint, the per-row
repetition penalty, the per-row sampler.

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

from idefics_kit import structured
from idefics_kit._vocab import Vocabulary, logits_width, vocabulary
from idefics_kit.errors import GenerationError
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions
from idefics_kit.results import FinishReason, Result, TokenLogprob, Usage

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


class _Ban(LogitsProcessor):  # type: ignore[misc]
    """Image and tile tokens are never generated (transformers' ``bad_words_ids`` for one-token words)."""

    def __init__(self, banned: Sequence[int]) -> None:
        self.banned = list(banned)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.banned] = -float("inf")
        return scores


class _LogprobCapture(LogitsProcessor):  # type: ignore[misc]
    """Keeps, per step, the log-softmax of the raw scores for the rows that asked.

    It runs first, so the distribution is the model's own: before banned
    tokens, grammar masks, repetition penalty, temperature, top-p and top-k.
    Only the chosen token's value (gathered one step later, when it is known)
    and the ``top_logprobs`` best are kept, not whole distributions.
    """

    def __init__(self, rows: Sequence[Row]) -> None:
        self.indices = [i for i, row in enumerate(rows) if row.options.logprobs]
        self.top = max((rows[i].options.top_logprobs for i in self.indices), default=0)
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []
        self.best: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._gather(input_ids[self.indices, -1])
        logprobs = torch.log_softmax(scores[self.indices].float(), dim=-1)
        self.previous = logprobs
        if self.top:
            values, ids = logprobs.topk(min(self.top, logprobs.shape[-1]), dim=-1)
            self.best.append((values.cpu(), ids.cpu()))
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        assert self.previous is not None
        self.chosen.append(self.previous.gather(1, tokens[:, None])[:, 0].cpu())
        self.previous = None

    def rows(self, sequences: torch.Tensor, vocab: Vocabulary) -> dict[int, list[TokenLogprob]]:
        """Per asking row: one TokenLogprob per generated step (trim to the kept ids)."""
        if self.previous is not None:
            self._gather(sequences[self.indices, -1])
        if not self.indices or not self.chosen:
            return {i: [] for i in self.indices}
        chosen = torch.stack(self.chosen, dim=1).tolist()
        generated = sequences[self.indices, sequences.shape[1] - len(self.chosen) :].tolist()
        best = [(v.tolist(), i.tolist()) for v, i in self.best]
        out: dict[int, list[TokenLogprob]] = {}
        for position, index in enumerate(self.indices):
            entries = []
            for step, (token, logprob) in enumerate(
                zip(generated[position], chosen[position], strict=True)
            ):
                top: tuple[TokenLogprob, ...] = ()
                if self.top:
                    values, ids = best[step]
                    top = tuple(
                        _token_logprob(vocab, alternative, value)
                        for alternative, value in zip(ids[position], values[position], strict=True)
                    )
                entries.append(_token_logprob(vocab, token, logprob, top))
            out[index] = entries
        return out


def _token_logprob(
    vocab: Vocabulary, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()
) -> TokenLogprob:
    return TokenLogprob(
        token_id=token,
        text=vocab.text(token),
        token_bytes=vocab.piece(token),
        logprob=logprob,
        top_logprobs=top,
    )


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


@dataclass(slots=True)
class _Extras:
    """The per-row parts that issue 13 adds: log-probabilities and grammar constraints."""

    stops: _RowStops
    vocab: Vocabulary
    capture: _LogprobCapture | None
    constraints: list[structured.RowConstraint | None]


def _generate_kwargs(
    adapter: FamilyAdapter, rows: Sequence[Row], inputs: Any, width: int = 0
) -> tuple[dict[str, Any], _Extras]:
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
    vocab = vocabulary(adapter.tokenizer, width)
    processors: list[Any] = []
    capture = None
    if any(row.options.logprobs for row in rows):
        # First: log-probabilities come from the raw scores.
        capture = _LogprobCapture(rows)
        processors.append(capture)
    if adapter.banned_token_ids:
        processors.append(_Ban(adapter.banned_token_ids))
    constraints: list[structured.RowConstraint | None] = [None] * len(rows)
    stops = _RowStops(adapter, rows, prompt_length)
    if any(row.options.constrained for row in rows):
        for index, row in enumerate(rows):
            compiled = structured.compile_constraint(vocab, adapter.stop_token_ids, row.options)
            if compiled is not None:
                constraints[index] = structured.RowConstraint(compiled)
        processors.append(
            structured.ConstraintProcessor(constraints, prompt_length, stops.finished)
        )
    if any(row.options.repetition_penalty != 1.0 for row in rows):
        padding = (prompt_length - inputs["attention_mask"].sum(dim=1)).tolist()
        processors.append(_RowRepetitionPenalty(rows, padding, device))
    if any(not row.options.greedy for row in rows):
        processors.append(_RowSampler(rows, device))
    kwargs["logits_processor"] = LogitsProcessorList(processors)
    kwargs["stopping_criteria"] = StoppingCriteriaList([stops])
    if any(row.on_token is not None for row in rows):
        kwargs["streamer"] = _RowStreamer(rows, stops, set(adapter.stop_token_ids))
    return kwargs, _Extras(stops=stops, vocab=vocab, capture=capture, constraints=constraints)


def generate(
    model: Any, adapter: FamilyAdapter, inputs: Any, rows: Sequence[Row], cache: Any = None
) -> list[Result]:
    """Run one micro-batch (already left-padded, on the model's device); a Result per row.

    With ``cache`` (all but the last prompt token, :mod:`prefill`), ``inputs``
    are the token ids and attention mask alone and decoding starts from it.
    """
    if len(rows) != int(inputs["input_ids"].shape[0]):
        raise ValueError(f"{len(rows)} rows for a batch of {inputs['input_ids'].shape[0]}")
    kwargs, extras = _generate_kwargs(adapter, rows, inputs, logits_width(model, adapter.tokenizer))
    prompt_length = int(inputs["input_ids"].shape[1])
    try:
        with torch.inference_mode():
            if cache is not None:
                kwargs["cache"] = cache
            output = model.generate(**inputs, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise GenerationError(f"model.generate failed: {type(exc).__name__}: {exc}") from exc
    prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    logprobs = extras.capture.rows(output, extras.vocab) if extras.capture is not None else {}
    results = []
    for index, (row, generated) in enumerate(
        zip(rows, output[:, prompt_length:].tolist(), strict=True)
    ):
        constraint = extras.constraints[index]
        if constraint is not None and constraint.dead_end:
            results.append(
                Result.failed(
                    GenerationError(
                        f"no token of this model's vocabulary can continue the {constraint.kind} "
                        "constraint here (a vocabulary that cannot spell every character, "
                        "like the toy model's words); the answer would not be valid"
                    )
                )
            )
            continue
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
                logprobs=tuple(logprobs[index][: len(done.token_ids)])
                if row.options.logprobs
                else None,
            )
        )
    return results


class TextDecoder:
    """Turns one row's token ids, as they arrive, into text pieces that are final.

    A piece is held back only while it ends in an incomplete character, in a
    run of byte-fallback pieces, or in what could be the start of a stop
    string. The pieces, followed by
    :meth:`rest` of the final result, join to exactly ``finish(...).text``.
    """

    def __init__(self, adapter: FamilyAdapter, options: GenerationOptions) -> None:
        self.adapter = adapter
        self.stop = options.stop
        self.limit = options.max_new_tokens
        self.stop_ids = set(adapter.stop_token_ids)
        self.byte_ids = adapter.byte_token_ids
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
        # A trailing run of byte-fallback pieces may still turn into other
        # characters (or into U+FFFD as a whole): hold all of it back.
        end = len(self.ids)
        while end and self.ids[end - 1] in self.byte_ids:
            end -= 1
        safe = _safe_text(self.adapter.decode(self.ids[:end]), self.stop)
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
