"""What a generation returns: :class:`Result`, :class:`Usage`, :class:`Timing`,
:class:`TokenLogprob`, and what scoring returns: :class:`ChoiceScore`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from idefics_kit.errors import IdeficsKitError

__all__ = ["ChoiceScore", "FinishReason", "Result", "Timing", "TokenLogprob", "Usage"]

FinishReason = Literal["stop", "length", "error"]
"""``"stop"``: a stop token or stop string ended the answer; ``"length"``:
max_new_tokens was reached; ``"error"``: the input failed (``Result.error``),
only with ``on_error="return"``."""


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
class Timing:
    """Where one request's time went: seconds since the request was made, on one monotonic clock.

    For ``generate``, ``stream``, ``agenerate`` and ``astream`` the request is
    made at the call, so ``prepare_s`` counts loading and decoding its images
    and encoding its prompt; a batch call prepares its conversations first and
    makes their requests after that (``prepare_s`` is then about 0).
    ``queue_s`` is the wait for a row in the running batch; the prefill (with
    the other requests admitted at the same step) ends at ``first_token_s``,
    the time to first token; ``total_s`` is when the answer was complete.
    A row restarted after an out-of-memory preemption reports its last
    admission.
    """

    prepare_s: float
    """From the request to the queue: images loaded and decoded, prompt encoded."""
    queue_s: float
    """Waiting in the queue for a row."""
    first_token_s: float
    """From the request to its first token (time to first token)."""
    total_s: float
    """From the request to its complete answer."""

    @property
    def prefill_s(self) -> float:
        """From admission to the first token: the prefill of the rows admitted with it."""
        return max(0.0, self.first_token_s - self.prepare_s - self.queue_s)

    @property
    def decode_s(self) -> float:
        """From the first token to the complete answer: the decoding steps it shared."""
        return max(0.0, self.total_s - self.first_token_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLogprob:
    """One generated token and its log-probability (natural log).

    ``logprob`` comes from the model's own next-token distribution: the
    log-softmax of its raw logits, before temperature, top-p, top-k,
    repetition penalty or a grammar constraint change them (vLLM's default).
    ``text`` is the token's own text, leading space included (``" red"``);
    a token holding part of a UTF-8 character shows U+FFFD there and its
    bytes in ``token_bytes``. ``top_logprobs`` holds the ``top_logprobs``
    most likely tokens of the same distribution, most likely first (their
    own ``top_logprobs`` are empty).
    """

    token_id: int
    text: str
    token_bytes: bytes
    logprob: float
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChoiceScore:
    """How likely the model finds one candidate answer to a conversation.

    ``logprob`` is the sum of the natural-log probabilities of the choice's
    tokens, each given the prompt and the tokens before it; ``num_tokens`` is
    how many tokens the choice has and ``mean_logprob`` is
    ``logprob / num_tokens`` (compare choices of different lengths with it).
    """

    choice: str
    logprob: float
    mean_logprob: float
    num_tokens: int


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
    error: IdeficsKitError | None = None
    """Why this input failed, when a batch ran with ``on_error="return"``."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One entry per id of ``token_ids`` when ``logprobs=True`` was asked, else None."""
    timing: Timing | None = field(default=None, compare=False)
    """Where this request's time went; None for a failed input. Not part of equality."""

    @property
    def ok(self) -> bool:
        """False when this input failed and ``error`` says why."""
        return self.error is None

    @classmethod
    def failed(cls, error: IdeficsKitError) -> Result:
        """The result standing for an input that failed with ``error``."""
        return cls(
            text="",
            token_ids=(),
            finish_reason="error",
            usage=Usage(prompt_tokens=0, completion_tokens=0),
            error=error,
        )
