"""What a generation returns: :class:`Result` and :class:`Usage`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FinishReason", "Result", "Usage"]

FinishReason = Literal["stop", "length"]
"""``"stop"``: a stop token or stop string ended the answer; ``"length"``: max_new_tokens."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts of one conversation.

    ``prompt_tokens`` counts every token of the model input for this
    conversation (BOS and expanded image tokens included, padding excluded);
    ``completion_tokens`` equals ``len(result.token_ids)``.
    """

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """``prompt_tokens + completion_tokens``."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The answer to one conversation.

    ``text`` is the decoded answer with special tokens removed, cut before a
    matched stop string. ``token_ids`` are the generated ids without the stop
    token and padding; when a stop string ended generation, the token that
    completed it is kept.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
