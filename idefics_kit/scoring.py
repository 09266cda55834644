"""Scoring: how likely the model finds each of several candidate answers.

``score(model, adapter, inputs, choices)`` runs the prompt through the model
once (images included), keeps its KV cache, and then runs every choice's
tokens on top of a copy of that cache, many choices per forward pass. No
token is generated. A choice's log-probability is the sum, over its tokens,
of the log-softmax of the model's raw logits at the position before each
token, exactly what a forward pass of prompt + choice gives.

A choice is scored as the exact text an answer would have: its tokens are the
tokenizer's encoding of the choice without special tokens, which decodes back
to the choice the way :meth:`FamilyAdapter.decode` decodes answers (in
SentencePiece families ``"red"`` is ``"▁red"``, the form an answer starts
with). A choice that does not decode back to itself (characters the
vocabulary cannot spell, control tokens) is an ``InvalidParameterError``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from idefics_kit.errors import InvalidParameterError
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.results import ChoiceScore

__all__ = ["MAX_CHOICES", "check_choices", "choice_token_ids", "score"]

MAX_CHOICES = 1024
DEFAULT_ROWS = 32
"""Choices per forward pass (each one holds a copy of the prompt's KV cache)."""


def check_choices(choices: object) -> tuple[str, ...]:
    """``choices`` as a tuple of strings, or :class:`InvalidParameterError`."""
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise InvalidParameterError(
            "choices", f"choices must be a list of strings, got {choices!r}", choices
        )
    if not 0 < len(choices) <= MAX_CHOICES:
        raise InvalidParameterError(
            "choices", f"choices must hold 1 to {MAX_CHOICES} strings, got {len(choices)}", choices
        )
    for choice in choices:
        if not isinstance(choice, str) or not choice:
            raise InvalidParameterError(
                "choices", f"choices must hold only non-empty strings, got {choice!r}", choices
            )
    return tuple(choices)


def choice_token_ids(adapter: FamilyAdapter, choice: str) -> tuple[int, ...]:
    """The token ids an answer reading exactly ``choice`` consists of."""
    ids: list[int] = adapter.tokenizer.encode(choice, add_special_tokens=False)
    special = set(adapter.tokenizer.all_special_ids)
    if not ids or any(i in special for i in ids) or adapter.decode(ids) != choice:
        spelled = adapter.decode(ids) if ids else ""
        raise InvalidParameterError(
            "choices",
            f"choice {choice!r} cannot be written as an answer with this model's vocabulary "
            f"(its tokens decode to {spelled!r})",
            choice,
        )
    return tuple(ids)


def score(
    model: Any,
    adapter: FamilyAdapter,
    inputs: Mapping[str, torch.Tensor],
    choices: Sequence[str],
    *,
    rows: int = DEFAULT_ROWS,
    cancelled: Callable[[], bool] | None = None,
) -> list[ChoiceScore]:
    """One :class:`ChoiceScore` per choice, in order, for one encoded conversation.

    ``inputs`` is one conversation's model input (batch of 1, on the model's
    device and dtype), as ``runner.prepare`` encodes it. ``rows`` bounds how
    many choices share a forward pass. ``cancelled`` is asked before each
    forward pass after the prompt's: True stops the scoring there
    (:class:`ScoringCancelled`).
    """
    if int(inputs["input_ids"].shape[0]) != 1:
        raise ValueError("score() takes the inputs of exactly one conversation")
    choices = check_choices(choices)
    tokens = [choice_token_ids(adapter, c) for c in choices]
    sums = [0.0] * len(tokens)
    with torch.inference_mode():
        output = model(**inputs, use_cache=True)
        first = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
        for index, ids in enumerate(tokens):
            sums[index] = float(first[ids[0]])
        longer = [i for i, ids in enumerate(tokens) if len(ids) > 1]
        cache = _cache_of(output)
        chunks = [longer[start : start + rows] for start in range(0, len(longer), rows)]
        for number, chunk in enumerate(chunks):
            if cancelled is not None and cancelled():
                raise ScoringCancelled("the scoring was cancelled by its caller")
            # The last chunk may take the prompt's cache itself.
            own = cache if number == len(chunks) - 1 else copy.deepcopy(cache)
            logprobs = _continuations(
                model, adapter, inputs, output, own, [tokens[i] for i in chunk]
            )
            for index, values in zip(chunk, logprobs, strict=True):
                sums[index] += values
    return [
        ChoiceScore(
            choice=choice,
            logprob=total,
            mean_logprob=total / len(ids),
            num_tokens=len(ids),
        )
        for choice, ids, total in zip(choices, tokens, sums, strict=True)
    ]


def _cache_of(output: Any) -> Any:
    # transformers 5 calls it ``cache``; earlier versions ``past_key_values``.
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _continuations(
    model: Any,
    adapter: FamilyAdapter,
    inputs: Mapping[str, torch.Tensor],
    output: Any,
    cache: Any,
    tokens: list[tuple[int, ...]],
) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after its first, given the prompt."""
    count = len(tokens)
    width = max(len(ids) for ids in tokens) - 1
    device = inputs["input_ids"].device
    # Right-padded: a causal model's real positions never see the padding after them.
    fed = torch.full((count, width), adapter.pad_token_id, dtype=torch.long, device=device)
    for row, ids in enumerate(tokens):
        fed[row, : len(ids) - 1] = torch.tensor(ids[:-1], device=device)
    prompt_length = int(inputs["input_ids"].shape[1])
    cache.batch_repeat_interleave(count)
    kwargs: dict[str, Any] = {
        "input_ids": fed,
        "attention_mask": torch.ones(
            (count, prompt_length + width), dtype=inputs["attention_mask"].dtype, device=device
        ),
        _cache_argument(model): cache,
        "use_cache": True,
    }
    for key in adapter.sequence_keys:
        if key not in ("input_ids", "attention_mask") and key in inputs:
            # Per-token inputs (IDEFICS 1's image_attention_mask): new tokens
            # continue the last prompt position, as generate() does.
            last = inputs[key][:, -1:]
            kwargs[key] = last.expand(count, width, *last.shape[2:])
    image_outputs = getattr(output, "image_outputs", None)
    if image_outputs is not None and image_outputs.last_hidden_state is not None:
        # Cross-attention models (IDEFICS 1) read the image features at every
        # step: hand back the encoder output of the prompt pass.
        features = image_outputs.last_hidden_state
        kwargs["image_encoder_embeddings"] = features.repeat(count, *([1] * (features.dim() - 1)))
    logits = model(**kwargs).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    sums = []
    for row, ids in enumerate(tokens):
        targets = torch.tensor(ids[1:], device=logprobs.device)
        picked = logprobs[row, : len(ids) - 1].gather(1, targets[:, None])
        sums.append(float(picked.sum()))
    return sums


_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(model: Any) -> str:
    """The name ``forward`` takes the KV cache under (``cache`` in transformers 5)."""
    kind = type(model)
    if kind not in _CACHE_ARGUMENT:
        import inspect

        names = inspect.signature(model.forward).parameters
        _CACHE_ARGUMENT[kind] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_ARGUMENT[kind]


class ScoringCancelled(Exception):
    """Raised inside the worker when a caller gave up on a scoring (nobody reads it)."""
