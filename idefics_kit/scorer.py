"""Scoring calls: check the choices, prepare each conversation, score it on the model's worker.

:class:`Scorer` carries out ``Generator.score``/``score_batch`` and their
async forms. Every conversation and choice is checked before any model work;
each conversation is then scored as one job on the scheduler's worker thread,
between decoding steps of the running batch (:meth:`Scheduler.call`), so a
scoring call never runs the model beside the engine. The numbers themselves
come from :mod:`idefics_kit.scoring`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import BatchFeature

from idefics_kit import runner, scoring
from idefics_kit.conversation import Conversation
from idefics_kit.errors import GenerationError, InvalidParameterError
from idefics_kit.families import FamilyAdapter
from idefics_kit.requests import timeout_error
from idefics_kit.results import ChoiceScore
from idefics_kit.runner import OnError, Prepared
from idefics_kit.scheduler import Scheduler
from idefics_kit.vision_cache import VisionCache

__all__ = ["Scorer", "choices_per_conversation"]


class Scorer:
    """Scores conversations' candidate answers with one model, through its scheduler."""

    def __init__(
        self,
        *,
        model: Any,
        adapter: FamilyAdapter,
        scheduler: Scheduler,
        inputs: runner.ModelInputs,
        cache: VisionCache | None,
        context: int | None,
    ) -> None:
        self._model = model
        self._adapter = adapter
        self._scheduler = scheduler
        self._inputs = inputs
        self._cache = cache
        self._context = context

    def score_all(
        self,
        items: list[Conversation],
        choices: Sequence[str] | Sequence[Sequence[str]],
        on_error: OnError,
        deadline: float | None,
        timeout: float | None,
        gave_up: threading.Event | None = None,
    ) -> list[list[ChoiceScore]]:
        """One list of scores per conversation, in order; see ``Generator.score_batch``.

        ``deadline`` (monotonic seconds) came from ``timeout``; setting
        ``gave_up`` stops the scoring at its next forward pass.
        """
        if on_error not in ("raise", "return"):
            raise InvalidParameterError(
                "on_error", f"on_error must be 'raise' or 'return', got {on_error!r}", on_error
            )
        per_item = choices_per_conversation(choices, len(items))
        for listed in dict.fromkeys(per_item):
            for choice in listed:
                scoring.choice_token_ids(self._adapter, choice)
        longest = {
            listed: max(len(scoring.choice_token_ids(self._adapter, c)) for c in listed)
            for listed in dict.fromkeys(per_item)
        }
        prepared = []
        for index, (conversation, listed) in enumerate(zip(items, per_item, strict=True)):
            item = runner.prepare(
                self._adapter,
                index,
                conversation,
                numbered=len(items) > 1,
                keep_images=self._cache is not None,
                context=self._context,
                max_new_tokens=longest[listed],
            )
            if item.error is not None and on_error == "raise":
                raise item.error.at_index(index) if len(items) > 1 else item.error
            prepared.append(item)
        results: list[list[ChoiceScore]] = []
        stop = gave_up or threading.Event()
        for item, listed in zip(prepared, per_item, strict=True):
            if item.error is not None:
                results.append([])
                continue
            work = functools.partial(self._score, item, listed, stop.is_set, deadline)
            try:
                results.append(
                    self._scheduler.call(work, deadline=deadline, on_timeout=timeout_error(timeout))
                )
            except GenerationError as exc:
                if on_error == "raise":
                    raise (exc.at_index(item.index) if len(items) > 1 else exc) from None
                results.append([])
            except BaseException:
                stop.set()  # timed out or interrupted: the scoring stops at its next pass
                raise
        return results

    def _score(
        self,
        item: Prepared,
        choices: tuple[str, ...],
        gave_up: Callable[[], bool],
        deadline: float | None,
    ) -> list[ChoiceScore]:
        # On the worker thread, between decoding steps.
        def cancelled() -> bool:
            return gave_up() or (deadline is not None and time.monotonic() > deadline)

        if cancelled():
            return []  # nobody waits for it any more
        encoded: dict[str, Any] = dict(item.inputs or {})
        if self._cache is not None and item.images:
            encoded = self._inputs.with_cached_features([item], encoded)
        inputs = BatchFeature(encoded).to(self._model.device, dtype=self._model.dtype)
        try:
            return scoring.score(self._model, self._adapter, inputs, choices, cancelled=cancelled)
        except scoring.ScoringCancelled:
            return []
        except torch.OutOfMemoryError as exc:
            raise GenerationError(f"out of memory while scoring: {exc}").with_traceback(
                None
            ) from None
        except Exception as exc:
            raise GenerationError(
                f"the model failed while scoring: {type(exc).__name__}: {exc}"
            ).with_traceback(None) from None


def choices_per_conversation(choices: object, count: int) -> list[tuple[str, ...]]:
    """``choices`` as one checked tuple per conversation (one shared list, or one list each)."""
    if (
        isinstance(choices, (list, tuple))
        and choices
        and all(isinstance(c, (list, tuple)) for c in choices)
    ):
        if len(choices) != count:
            raise InvalidParameterError(
                "choices",
                f"choices must hold one list per conversation ({count}), got {len(choices)}",
                choices,
            )
        return [scoring.check_choices(c) for c in choices]
    shared = scoring.check_choices(choices)
    return [shared] * count
