"""The decode loop: rows join and leave a running batch, one token per row per step.

:class:`Engine` owns the model's running batch (:class:`~idefics_kit.kv.BatchCache`)
and its :class:`Row` values, one per request being answered. The scheduler's
worker drives it:

- :meth:`Engine.admit` prefills new rows (images included, in parts of
  similar prompt length for families whose images enter as token
  embeddings), picks each one's first token and joins their caches to the
  running batch;
- :meth:`Engine.step` feeds every running row its last token and picks the
  next one;
- :meth:`Engine.evict` removes the rows that finished or were cancelled and
  hands back their results at once.

Everything per row is computed from that row alone, in this order: the
log-probability capture (the model's raw scores), the ban on image and tile
tokens, the row's grammar constraint, its repetition penalty over its own
tokens, then its sampler (its own ``torch.Generator``) or argmax. So a row's
tokens do not depend on what shares its batch, nor on when it joined. The
forward passes are those ``model.generate`` runs (same inputs, same position
ids, ``logits_to_keep=1``), so a lone row gets ``generate``'s tokens.

Results and streams share :func:`finish`, and a streaming row's
:class:`~idefics_kit.detokenize.TextDecoder` emits only prefixes of ``finish``'s text, so a stream's
pieces always join to the final text.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import BatchFeature, DynamicCache
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from idefics_kit import structured
from idefics_kit._vocab import Vocabulary, logits_width, vocabulary
from idefics_kit.batching import prefill_parts
from idefics_kit.errors import GenerationError
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.kv import BatchCache, joinable
from idefics_kit.options import GenerationOptions
from idefics_kit.results import FinishReason, Result, TokenLogprob, Usage

__all__ = ["Engine", "Finished", "Row", "finish"]

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


@dataclass(slots=True, kw_only=True, eq=False)
class Row:
    """One request's row in the running batch: its options, hooks and progress.

    ``on_token`` (streams) gets each generated token id at the step that
    made it; ``cancelled`` is polled after every step, and a row for which it
    returns True leaves the batch there without touching the others.
    ``seed`` draws a sampled row's numbers (``options.seed``, else one drawn
    once per request, so a row restarted after an out-of-memory preemption
    draws the same tokens). ``skip`` tokens are not handed to ``on_token``
    again (they were, before a restart).
    """

    options: GenerationOptions
    on_token: Callable[[int], None] | None = None
    cancelled: Callable[[], bool] = field(default=_never)
    owner: object = None
    seed: int | None = None
    skip: int = 0
    prompt_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False
    _prompt_ids: torch.Tensor | None = None
    _sampler: tuple[list[Any], torch.Generator] | None = None
    _constraint: structured.RowConstraint | None = None
    _logprobs: list[TokenLogprob] | None = None
    _window: int = 0

    @property
    def finished(self) -> bool:
        """True once the row needs no more steps (done, or cancelled by its caller)."""
        return self.done or self.cancelled()


class Engine:
    """The running batch of one model; only the scheduler's worker thread calls it.

    ``inputs`` turns prepared items into model inputs on the model's device
    (collated, left-padded, image features from the vision cache).
    """

    def __init__(
        self,
        model: Any,
        adapter: FamilyAdapter,
        inputs: Callable[[Sequence[Any]], BatchFeature],
    ) -> None:
        self.model = model
        self.adapter = adapter
        self._inputs = inputs
        self.rows: list[Row] = []
        self._state: BatchCache | None = None
        self._tokens: torch.Tensor | None = None
        self._stop_ids = frozenset(adapter.stop_token_ids)
        self._banned = list(adapter.banned_token_ids)
        self._vocab: Vocabulary | None = None
        self._keep_one = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def columns(self) -> int:
        """The running batch's length in tokens (padding included); 0 when empty."""
        return 0 if self._state is None else self._state.columns

    def joinable(self, length: int) -> bool:
        """Whether rows up to ``length`` tokens (prompt, answer and padding) can share the batch."""
        return joinable(self.model, length)

    # -- admission -----------------------------------------------------------------

    def admit(self, items: Sequence[Any], rows: Sequence[Row]) -> None:
        """Prefill ``items`` (prepared conversations) and add them as ``rows`` to the batch.

        Raises :class:`GenerationError` (or ``torch.OutOfMemoryError``) with
        the batch unchanged when the prefill fails.
        """
        parts: list[list[int]] = []
        groups: dict[Any, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.group, []).append(index)
        for members in groups.values():
            # Rows with other model input keys (images or not) prefill apart;
            # with images as token embeddings, similar lengths pad less.
            if self.adapter.prefills_in_parts:
                lengths = [items[i].length for i in members]
                parts += [[members[i] for i in part] for part in prefill_parts(lengths)]
            else:
                parts.append(members)
        prefilled: list[tuple[list[int], torch.Tensor, BatchCache]] = []
        for part in parts:
            logits, state = self._prefill([items[i] for i in part])
            prefilled.append((part, logits, state))
        order = [i for part, _, _ in prefilled for i in part]
        for part, logits, state in prefilled:
            joining = [rows[i] for i in part]
            for index, row in zip(part, joining, strict=True):
                self._start(row, items[index])
            tokens = self._choose(joining, logits)
            self._join(state, tokens)
        self.rows.extend(rows[i] for i in order)

    def _prefill(self, items: Sequence[Any]) -> tuple[torch.Tensor, BatchCache]:
        inputs = self._inputs(items)
        mask = inputs["attention_mask"]
        # What generate() derives from the mask: positions count real tokens only.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        kwargs: dict[str, Any] = dict(inputs)
        kwargs.update(position_ids=positions, cache=cache)
        with torch.inference_mode():
            output = self._forward(kwargs, "the prefill")
            logits = output.logits[:, -1].to(copy=True, dtype=torch.float32)
            extras = self.adapter.decode_inputs(inputs, output)
        state = BatchCache(cache, mask, positions[:, -1] + 1, extras)
        return logits, state

    def _forward(self, kwargs: dict[str, Any], what: str) -> Any:
        """One forward pass as ``generate`` runs it; its failures as :class:`GenerationError`."""
        kwargs["use_cache"] = True
        if self._keep_one:
            kwargs["logits_to_keep"] = 1
        try:
            return self.model(**kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            # Without the original: its traceback would keep this step's tensors alive.
            raise GenerationError(f"{what} failed: {type(exc).__name__}: {exc}").with_traceback(
                None
            ) from None

    def _start(self, row: Row, item: Any) -> None:
        """Per-row state that lives as long as the row: sampler, constraint, penalty ids."""
        options = row.options
        ids = item.inputs["input_ids"][0]
        real = item.inputs["attention_mask"][0].bool()
        row.prompt_tokens = int(real.sum())
        row.generated = []
        row.done = False
        if options.repetition_penalty != 1.0:
            row._prompt_ids = ids[real].to(self.model.device)
        if not options.greedy:
            warpers: list[Any] = [TemperatureLogitsWarper(options.temperature)]
            if options.top_k is not None:
                warpers.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                warpers.append(TopPLogitsWarper(options.top_p))
            seed = options.seed if options.seed is not None else row.seed
            if seed is None:
                seed = row.seed = secrets.randbits(63)
            generator = torch.Generator(self.model.device).manual_seed(seed)
            row._sampler = (warpers, generator)
        if options.constrained:
            compiled = structured.compile_constraint(
                self._vocabulary(), self.adapter.stop_token_ids, options
            )
            row._constraint = structured.RowConstraint(compiled) if compiled is not None else None
        row._logprobs = [] if options.logprobs else None
        row._window = max(len(s) for s in options.stop) + _STOP_WINDOW_SLACK if options.stop else 0

    def _join(self, state: BatchCache, tokens: torch.Tensor) -> None:
        if self._state is None:
            self._state, self._tokens = state, tokens
            return
        assert self._tokens is not None
        self._state.join(state)
        self._tokens = torch.cat([self._tokens, tokens])

    # -- decoding ------------------------------------------------------------------

    def step(self) -> None:
        """One token for every running row (rows that finished wait for :meth:`evict`)."""
        if self._state is None or not self.rows:
            return
        assert self._tokens is not None
        inputs = self._state.step_inputs(self._tokens)
        with torch.inference_mode():
            output = self._forward(inputs, "a decoding step")
            logits = output.logits[:, -1].to(copy=True, dtype=torch.float32)
            del output
        self._state.stepped()
        self._tokens = self._choose(self.rows, logits)

    def evict(self) -> list[Row]:
        """Remove finished and cancelled rows from the batch; returns them, in batch order."""
        gone = [row for row in self.rows if row.finished]
        if gone:
            self._keep([i for i, row in enumerate(self.rows) if not row.finished])
        return gone

    def preempt(self, count: int) -> list[Row]:
        """Take the ``count`` newest rows out of the batch, unfinished (to run again later)."""
        count = min(count, len(self.rows))
        taken = self.rows[len(self.rows) - count :]
        self._keep(list(range(len(self.rows) - count)))
        return taken

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (batch positions, in order)."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.clear()
            return
        assert self._state is not None
        assert self._tokens is not None
        self._state.select(keep)
        self._tokens = self._tokens.index_select(0, torch.tensor(keep, device=self._tokens.device))

    def clear(self) -> list[Row]:
        """Drop the whole batch (after a failure, or when the last row left); returns its rows."""
        rows, self.rows = self.rows, []
        self._state = None
        self._tokens = None
        return rows

    def result(self, row: Row) -> Result:
        """The Result of a finished row."""
        constraint = row._constraint
        if constraint is not None and constraint.dead_end:
            return Result.failed(
                GenerationError(
                    f"no token of this model's vocabulary can continue the {constraint.kind} "
                    "constraint here (a vocabulary that cannot spell every character, "
                    "like the toy model's words); the answer would not be valid"
                )
            )
        options = row.options
        done = finish(self.adapter, row.generated[: options.max_new_tokens], options.stop)
        return Result(
            text=done.text,
            token_ids=done.token_ids,
            finish_reason=done.finish_reason,
            usage=Usage(prompt_tokens=row.prompt_tokens, completion_tokens=len(done.token_ids)),
            logprobs=tuple(row._logprobs[: len(done.token_ids)])
            if row._logprobs is not None
            else None,
        )

    # -- per-row token choice ------------------------------------------------------

    def _vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = vocabulary(
                self.adapter.tokenizer, logits_width(self.model, self.adapter.tokenizer)
            )
        return self._vocab

    def _choose(self, rows: Sequence[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its scores; updates the rows (ids, stops, streams)."""
        with torch.inference_mode():  # the logits are inference tensors, changed in place
            return self._choose_tokens(rows, logits)

    def _choose_tokens(self, rows: Sequence[Row], logits: torch.Tensor) -> torch.Tensor:
        asking = [i for i, row in enumerate(rows) if row._logprobs is not None and not row.done]
        raw = torch.log_softmax(logits[asking], dim=-1) if asking else None
        if self._banned:
            logits[:, self._banned] = -float("inf")
        for index, row in enumerate(rows):
            if row.done:
                continue
            if row._constraint is not None:
                allowed = row._constraint.allowed_mask().to(logits.device)
                size = min(int(allowed.shape[0]), int(logits.shape[-1]))
                logits[index, size:] = -float("inf")
                logits[index, :size].masked_fill_(~allowed[:size], -float("inf"))
            if row._prompt_ids is not None:
                ids = torch.cat(
                    [
                        row._prompt_ids,
                        torch.tensor(row.generated, dtype=torch.long).to(logits.device),
                    ]
                )
                picked = logits[index].gather(0, ids)
                penalty = row.options.repetition_penalty
                picked = torch.where(picked < 0, picked * penalty, picked / penalty)
                logits[index].scatter_(0, ids, picked)
        tokens = torch.argmax(logits, dim=-1)
        for index, row in enumerate(rows):
            if row._sampler is not None and not row.done:
                warpers, generator = row._sampler
                scores = logits[index : index + 1]
                for warper in warpers:
                    scores = warper(None, scores)
                probs = torch.softmax(scores.float(), dim=-1)
                tokens[index] = torch.multinomial(probs[0], 1, generator=generator)[0]
        picked_ids: list[int] = tokens.tolist()
        if raw is not None:
            self._capture(rows, asking, raw, picked_ids)
        for row, token in zip(rows, picked_ids, strict=True):
            if not row.done:
                self._advance(row, token)
        return tokens

    def _capture(
        self, rows: Sequence[Row], asking: list[int], raw: torch.Tensor, tokens: list[int]
    ) -> None:
        vocab = self._vocabulary()
        chosen = raw.gather(1, torch.tensor([tokens[i] for i in asking])[:, None].to(raw.device))
        top = max(rows[i].options.top_logprobs for i in asking)
        best = raw.topk(min(top, raw.shape[-1]), dim=-1) if top else None
        chosen_values = chosen[:, 0].tolist()
        values = best.values.tolist() if best is not None else []
        ids = best.indices.tolist() if best is not None else []
        for position, index in enumerate(asking):
            row = rows[index]
            assert row._logprobs is not None
            alternatives: tuple[TokenLogprob, ...] = ()
            if top:
                alternatives = tuple(
                    _token_logprob(vocab, alternative, value)
                    for alternative, value in zip(ids[position], values[position], strict=True)
                )
            row._logprobs.append(
                _token_logprob(vocab, tokens[index], chosen_values[position], alternatives)
            )

    def _advance(self, row: Row, token: int) -> None:
        """Record ``token`` for ``row``: grammar, stream, then its stop conditions."""
        row.generated.append(token)
        if row._constraint is not None:
            row._constraint.advance(token)
        if row.on_token is not None and len(row.generated) > row.skip:
            row.on_token(token)
        options = row.options
        if token in self._stop_ids or len(row.generated) >= options.max_new_tokens:
            row.done = True
        elif options.stop:
            tail = self.adapter.decode(row.generated[-row._window :])
            row.done = _find_stop(tail, options.stop) is not None


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
