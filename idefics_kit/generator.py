"""``Generator``: load a checkpoint once, answer conversations.

The public API, over request handles: every call makes one
:class:`~idefics_kit.requests.Request` per conversation at once, has it
prepared (checked, images decoded, prompt encoded) in the calling thread (or,
for the async methods, a worker thread off the event loop) and queues it with
the :class:`~idefics_kit.scheduler.Scheduler`, whose one worker thread owns
the model and runs the continuous-batching :class:`~idefics_kit.engine.Engine`.
Concurrent callers therefore share the running batch; each gets the token ids
a lone call would have given. Loading lives in :mod:`idefics_kit.loading`.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import weakref
from collections import abc
from collections.abc import Iterable, Sequence, Sized
from types import TracebackType
from typing import Any, TypeVar

import torch

from idefics_kit import engine, loading, runner, structured
from idefics_kit._vocab import logits_width, vocabulary
from idefics_kit.batching import plan
from idefics_kit.conversation import Conversation
from idefics_kit.detokenize import TextDecoder
from idefics_kit.devices import DeviceLike, DTypeLike
from idefics_kit.errors import (
    ConversationError,
    InvalidParameterError,
    ModelLoadError,
)
from idefics_kit.families import Family, FamilyAdapter
from idefics_kit.options import GenerationOptions
from idefics_kit.progress import ProgressBar
from idefics_kit.requests import CANCELLED, Outcome, Request
from idefics_kit.requests import Waiter as _Waiter
from idefics_kit.requests import deadline as _deadline
from idefics_kit.requests import future_outcome as _future
from idefics_kit.requests import settled as _settled
from idefics_kit.requests import within as _within
from idefics_kit.results import ChoiceScore, Result
from idefics_kit.runner import OnError, Prepared
from idefics_kit.scheduler import DEFAULT_MAX_PREFILL_TOKENS, BatchSize, Scheduler, SchedulerStats
from idefics_kit.scheduler import batch_limit as _batch_limit
from idefics_kit.scheduler import check_batch_size as _check_batch_size
from idefics_kit.scorer import Scorer
from idefics_kit.streams import AsyncTextStream, TextStream
from idefics_kit.vision_cache import VisionCache, VisionCacheStats

__all__ = ["Generator"]

DEFAULT_VISION_CACHE_MB = 256.0
DEFAULT_MAX_QUEUED = 1024
T = TypeVar("T")


class Generator:
    """Answers :class:`Conversation` values with one IDEFICS-family model.

    Build it with :meth:`from_pretrained` (a hub id or a local folder) or
    :meth:`from_model` (objects the application already loaded).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        adapter: FamilyAdapter,
        vision_cache_mb: float,
        *,
        max_batch_size: BatchSize = "auto",
        max_wait_ms: float = 0.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ) -> None:
        _check_batch_size("max_batch_size", max_batch_size)
        if (
            isinstance(max_prefill_tokens, bool)
            or not isinstance(max_prefill_tokens, int)
            or max_prefill_tokens < 1
        ):
            raise InvalidParameterError(
                "max_prefill_tokens",
                f"max_prefill_tokens must be an int >= 1, got {max_prefill_tokens!r}",
                max_prefill_tokens,
            )
        wait = max_wait_ms if isinstance(max_wait_ms, (int, float)) else math.nan
        if isinstance(max_wait_ms, bool) or not (math.isfinite(wait) and wait >= 0):
            raise InvalidParameterError(
                "max_wait_ms",
                f"max_wait_ms must be a finite number >= 0 (0: never wait), got {max_wait_ms!r}",
                max_wait_ms,
            )
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise InvalidParameterError(
                "max_queued", f"max_queued must be an int >= 1, got {max_queued!r}", max_queued
            )
        self.model = model
        self.processor = processor
        self._adapter = adapter
        self._cache = VisionCache(vision_cache_mb) if vision_cache_mb != 0 else None
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self._context: int | None = int(limit) if isinstance(limit, int) else None
        self.max_batch_size: BatchSize = max_batch_size
        self.max_wait_ms = float(wait)
        self.max_queued = max_queued
        self.max_prefill_tokens = max_prefill_tokens
        self._inputs = runner.ModelInputs(model, adapter, self._cache)
        self._scheduler = Scheduler(
            engine.Engine(model, adapter, self._inputs),
            max_batch_size=_batch_limit(model, max_batch_size),
            max_wait_ms=self.max_wait_ms,
            max_queued=max_queued,
            max_prefill_tokens=max_prefill_tokens,
        )
        self._scorer = Scorer(
            model=model,
            adapter=adapter,
            scheduler=self._scheduler,
            inputs=self._inputs,
            cache=self._cache,
            context=self._context,
        )
        # The worker thread holds the scheduler, not the Generator: dropping
        # the last reference to a Generator stops its worker.
        weakref.finalize(self, self._scheduler.close)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike[str],
        *,
        device: DeviceLike = "auto",
        dtype: DTypeLike = "auto",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        device_map: str | dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        vision_cache_mb: float = DEFAULT_VISION_CACHE_MB,
        allow_pickle: bool = False,
        max_batch_size: BatchSize = "auto",
        max_wait_ms: float = 0.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        adapter: str | os.PathLike[str] | None = None,
    ) -> Generator:
        """Load a checkpoint of any supported family from the hub or a folder.

        ``"toy"`` names the tiny IDEFICS 3 model shipped inside this package
        (it answers questions about simple shape pictures; see
        docs/toy-model.md): it loads offline, through the same path as any
        other checkpoint. A local folder called ``toy`` is ``"./toy"``.

        ``device="auto"`` picks CUDA, then MPS, then the CPU; ``dtype="auto"``
        picks bfloat16 (float16 where unsupported) on CUDA and float32 on the
        CPU. ``device_map`` (e.g. ``"auto"``) hands placement to accelerate
        instead, for models spread over several GPUs. ``vision_cache_mb``
        bounds the cache of vision-encoder outputs (keyed by image content, so
        asking about the same picture again skips the encoder); 0 turns it off.

        ``max_batch_size``, ``max_wait_ms``, ``max_queued`` and
        ``max_prefill_tokens`` configure how concurrent calls share the model
        (docs/concurrency.md): requests join the running batch as rows free
        up, at most ``max_batch_size`` rows at once (``"auto"``: as many as
        fit in free GPU memory, 8 on the CPU); ``max_wait_ms`` > 0 lets an
        idle worker wait that long for more rows before starting (default 0:
        never wait); while rows run, at most ``max_prefill_tokens`` prompt
        tokens are admitted per decoding step (the oldest waiting request is
        always admitted when a row is free); past ``max_queued`` waiting
        requests, a call fails at once with :class:`~idefics_kit.OverloadedError`.

        Weights load only from safetensors files: pickled ``.bin`` weights can
        run code while loading, so a checkpoint that has only those needs
        ``allow_pickle=True`` (for checkpoints you trust). Custom model code
        from a checkpoint (``trust_remote_code``) is never run.

        ``adapter`` is a LoRA adapter folder (``idefics-kit finetune``'s
        output), merged into the base model's weights once, at load. An
        adapter folder also loads on its own as ``model_id``: it records its
        base model. Adapters need the ``[train]`` extra (``peft``).
        """
        model, processor = loading.load_pretrained(
            model_id,
            device=device,
            dtype=dtype,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            device_map=device_map,
            attn_implementation=attn_implementation,
            allow_pickle=allow_pickle,
            adapter=adapter,
        )
        return cls.from_model(
            model,
            processor,
            vision_cache_mb=vision_cache_mb,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queued=max_queued,
            max_prefill_tokens=max_prefill_tokens,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        processor: Any,
        *,
        vision_cache_mb: float = DEFAULT_VISION_CACHE_MB,
        max_batch_size: BatchSize = "auto",
        max_wait_ms: float = 0.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    ) -> Generator:
        """Wrap a model and processor the application has already loaded.

        The model stays where it is (device, dtype) and is switched to eval
        mode. The scheduling keywords are those of :meth:`from_pretrained`.
        """
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        adapter_cls = loading.adapter_class(str(model_type), type(model).__name__)
        if getattr(processor, "tokenizer", None) is None:
            raise ModelLoadError(
                f"processor {type(processor).__name__} has no tokenizer; pass the model's "
                "AutoProcessor, not its image processor or tokenizer alone"
            )
        model.eval()
        adapter = adapter_cls(processor, model.generation_config)
        return cls(
            model,
            processor,
            adapter,
            vision_cache_mb,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queued=max_queued,
            max_prefill_tokens=max_prefill_tokens,
        )

    # -- properties ----------------------------------------------------------

    @property
    def family(self) -> Family:
        """``"idefics"``, ``"idefics2"``, ``"idefics3"`` or ``"smolvlm"``."""
        return self._adapter.family

    @property
    def device(self) -> torch.device:
        """Where the model inputs go (the first device of a multi-GPU model)."""
        device: torch.device = self.model.device
        return device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        dtype: torch.dtype = self.model.dtype
        return dtype

    @property
    def vision_cache(self) -> VisionCacheStats | None:
        """Hits, misses and size of the vision cache; None when it is off."""
        return None if self._cache is None else self._cache.stats()

    def clear_vision_cache(self) -> None:
        """Forget every cached image encoding."""
        if self._cache is not None:
            self._scheduler.call(self._cache.clear)

    @property
    def image_box(self) -> tuple[tuple[int, int] | None, bool]:
        """The largest image (width, height) the processor uses, and whether it keeps the aspect.

        An image within the box reaches the model as decoded; a larger one is
        resized by the processor anyway, so a caller may scale it down first
        (the server does, to bound memory). ``(None, True)``: no known limit.
        """
        return self._adapter.image_box()

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer: the checkpoint's eos ids and ``<end_of_utterance>``."""
        return self._adapter.stop_token_ids

    @property
    def banned_token_ids(self) -> tuple[int, ...]:
        """Token ids the model is never allowed to generate (image and tile tokens)."""
        return self._adapter.banned_token_ids

    def __repr__(self) -> str:
        return f"Generator(family={self.family!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker thread; idempotent.

        Requests still queued, and rows running at that moment (they stop
        after the current decoding step), fail with
        :class:`~idefics_kit.GeneratorClosedError`; so does every later call.
        The model itself stays loaded (``gen.model``) until the Generator is
        dropped.
        """
        self._scheduler.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._scheduler.closed

    @property
    def ready(self) -> bool:
        """True while the Generator can take work: not closed and its worker alive.

        A server's health check answers from it (``/health`` is 503 when False).
        """
        return not self._scheduler.closed

    @property
    def failure(self) -> BaseException | None:
        """Why the model's worker stopped on its own (an :class:`~idefics_kit.EngineFailedError`).

        None while it runs, and after a plain :meth:`close`.
        """
        return self._scheduler.failure

    def __enter__(self) -> Generator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Generator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def stats(self) -> SchedulerStats:
        """Queue depth, running rows, batches, tokens: what an app exports as metrics."""
        return self._scheduler.stats()

    # -- generation ----------------------------------------------------------

    def generate(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
        **overrides: Any,
    ) -> Result:
        """Answer the last user turn of ``conversation``.

        ``overrides`` are :class:`GenerationOptions` fields
        (``max_new_tokens=64``) applied on top of ``options``. ``timeout``
        (seconds, from this call) raises :class:`~idefics_kit.RequestTimeoutError`
        and frees the row. Safe to call from many threads at once: concurrent
        calls share the running batch.
        """
        resolved = self._resolve(options, overrides)
        deadline = _deadline(timeout)
        waiter = _Waiter()
        request = Request(resolved, waiter)
        if deadline is None:
            self._arrive(request, conversation)
        else:
            # The timeout counts from this call, image downloads included:
            # preparation runs beside the wait, and a request that times out
            # while it is prepared is never queued.
            threading.Thread(
                target=self._arrive_or_fail,
                args=(request, conversation),
                name="idefics-kit-prepare",
                daemon=True,
            ).start()
        result = waiter.wait(request, deadline, timeout)
        if result.error is not None:
            raise result.error
        return result

    def generate_batch(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None = None,
        *,
        batch_size: BatchSize | None = None,
        on_error: OnError = "raise",
        progress: bool = False,
        timeout: float | None = None,
        **overrides: Any,
    ) -> list[Result]:
        """Answer many conversations; one :class:`Result` per input, in input order.

        Every conversation is checked, its images decoded and its prompt
        encoded before any model work. They then join the running batch as
        rows free up, at most ``batch_size`` rows at once (default: the
        Generator's ``max_batch_size``), possibly beside rows of other
        callers; out-of-memory errors are recovered from (docs/concurrency.md).
        With greedy decoding, or sampling with a ``seed``, a conversation's
        answer does not depend on its batch.

        ``on_error="raise"`` raises the first failing input's error (its
        ``index`` says which input): input errors before any model work, a
        generation error as soon as it is that input's turn; results already
        computed are discarded and the call's remaining rows cancelled.
        ``"return"`` gives each failing input a :class:`Result` whose
        ``error`` says why and answers the rest.
        """
        items = list(conversations)
        return list(
            self._run(
                items, options, overrides, batch_size, on_error, progress, len(items), timeout
            )
        )

    def iter_batch(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None = None,
        *,
        batch_size: BatchSize | None = None,
        on_error: OnError = "raise",
        progress: bool = False,
        window: int | None = None,
        timeout: float | None = None,
        **overrides: Any,
    ) -> abc.Generator[Result, None, None]:
        """Like :meth:`generate_batch`, for jobs too large to hold in memory.

        Reads ``conversations`` lazily, ``window`` at a time (default: four
        batches, at least 32), and yields results in input order as each
        window finishes; the next window's images are decoded while the model
        works. A bad input is only found when its window is read, so with
        ``on_error="raise"`` earlier results may already have been yielded.
        Closing the iterator early cancels the rows it had queued.
        """
        plain = batch_size if isinstance(batch_size, int) else runner.CPU_BATCH_SIZE
        size = window if window is not None else max(32, 4 * plain)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidParameterError(
                "window", f"window must be an int >= 1, got {window!r}", window
            )
        return self._run(
            conversations, options, overrides, batch_size, on_error, progress, size, timeout
        )

    def stream(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
        **overrides: Any,
    ) -> TextStream:
        """Start answering and return the answer's text pieces as they become final.

        ``"".join(gen.stream(conv, ...))`` equals ``gen.generate(conv, ...).text``;
        after the last piece, ``stream.result`` holds the full Result. Closing
        the stream early stops its row (other callers' rows go on).
        """
        resolved = self._resolve(options, overrides)
        _deadline(timeout)
        stream = TextStream(TextDecoder(self._adapter, resolved), resolved, timeout)
        self._arrive(stream.request, conversation)
        return stream

    # -- asyncio -------------------------------------------------------------------

    async def agenerate(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
        **overrides: Any,
    ) -> Result:
        """:meth:`generate` for asyncio; the event loop is never blocked.

        The conversation is prepared in a worker thread and answered by the
        model's worker. Cancelling the awaiting task frees its row at the
        next decoding step and affects no other request.
        """
        resolved = self._resolve(options, overrides)
        _deadline(timeout)

        future, settle = _future()
        request = Request(resolved, settle)

        async def answer() -> Result:
            await self._arrive_off_loop(request, conversation)
            return await _settled(future, request)

        try:
            result = await _within(answer(), timeout)
        except BaseException:
            request.cancel()  # cancelled or timed out in any stage: never queued, or freed
            raise
        if result.error is not None:
            raise result.error
        return result

    def astream(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        *,
        timeout: float | None = None,
        **overrides: Any,
    ) -> AsyncTextStream:
        """:meth:`stream` for ``async for``; ``stream.result`` after the last piece.

        Options are checked now; the conversation is prepared (off the event
        loop) when iteration starts, so its input errors come from the first
        ``__anext__``. Cancelling the iterating task or ``await
        stream.aclose()`` frees the row.
        """
        resolved = self._resolve(options, overrides)
        _deadline(timeout)

        async def submit(request: Request) -> None:
            await self._arrive_off_loop(request, conversation)

        return AsyncTextStream(TextDecoder(self._adapter, resolved), resolved, timeout, submit)

    async def agenerate_batch(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None = None,
        *,
        batch_size: BatchSize | None = None,
        on_error: OnError = "raise",
        timeout: float | None = None,
        **overrides: Any,
    ) -> list[Result]:
        """:meth:`generate_batch` for asyncio: same rules, results in input order."""
        resolved, cap = self._batch_arguments(options, overrides, batch_size, on_error, timeout)
        items = list(conversations)

        async def answer() -> list[Result]:
            wave = await asyncio.to_thread(
                lambda: [self._prepare(i, c, resolved, numbered=True) for i, c in enumerate(items)]
            )
            _raise_input_error(wave, on_error)
            pending: dict[int, tuple[asyncio.Future[Outcome], Request]] = {}
            requests = []
            for item in _submission_order(wave):
                future, settle = _future()
                request = Request(resolved, settle, cap=cap, item=item)
                pending[item.index] = (future, request)
                requests.append(request)
            try:
                await asyncio.to_thread(self._scheduler.submit, requests, wait_for_room=True)
                results = []
                for item in wave:
                    if item.error is not None:
                        results.append(Result.failed(item.error))
                        continue
                    future, request = pending[item.index]
                    result = await _settled(future, request)
                    results.append(_checked(result, item.index, on_error))
                return results
            finally:
                for _, request in pending.values():
                    request.cancel()

        return await _within(answer(), timeout)

    # -- internals -------------------------------------------------------------

    async def _arrive_off_loop(self, request: Request, conversation: Conversation) -> None:
        """:meth:`_arrive` in asyncio's default executor, counted as arriving from now on.

        The executor has a few threads; a call still waiting for one has not
        started preparing, yet the model's worker must wait for it as for a
        call being prepared, or it starts a batch without it (16 tasks
        answered at once made batches of 15.4 rows on average, not 16).
        """
        with self._scheduler.arriving():
            await asyncio.to_thread(self._arrive, request, conversation)

    def _arrive(self, request: Request, conversation: Conversation) -> None:
        """Prepare and queue one request (the async methods run this in a thread).

        Input errors are raised; a request cancelled meanwhile is not queued.
        """
        with self._scheduler.arriving():
            if request.cancelled:
                request.finish(CANCELLED)
                return
            item = self._prepare(0, conversation, request.options, numbered=False)
            if item.error is not None:
                request.cancel(item.error)
                request.finish(item.error)
                raise item.error
            request.item = item
            self._scheduler.submit([request])

    def _arrive_or_fail(self, request: Request, conversation: Conversation) -> None:
        """:meth:`_arrive` in a thread of its own: its errors become the request's outcome."""
        try:
            self._arrive(request, conversation)
        except BaseException as exc:
            request.finish(exc)

    def _batch_arguments(
        self,
        options: GenerationOptions | None,
        overrides: dict[str, Any],
        batch_size: BatchSize | None,
        on_error: OnError,
        timeout: float | None,
    ) -> tuple[GenerationOptions, int | None]:
        resolved = self._resolve(options, overrides)
        if batch_size is not None:
            _check_batch_size("batch_size", batch_size)
        if on_error not in ("raise", "return"):
            raise InvalidParameterError(
                "on_error", f"on_error must be 'raise' or 'return', got {on_error!r}", on_error
            )
        _deadline(timeout)
        return resolved, batch_size if isinstance(batch_size, int) else None

    def _run(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None,
        overrides: dict[str, Any],
        batch_size: BatchSize | None,
        on_error: OnError,
        progress: bool,
        window: int,
        timeout: float | None,
    ) -> abc.Generator[Result, None, None]:
        # Arguments are checked here, eagerly, not when the iterator starts.
        resolved, cap = self._batch_arguments(options, overrides, batch_size, on_error, timeout)
        total = len(conversations) if isinstance(conversations, Sized) else None
        return self._results(
            conversations, resolved, cap, on_error, progress, max(1, window), total, timeout
        )

    def _results(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions,
        cap: int | None,
        on_error: OnError,
        progress: bool,
        window: int,
        total: int | None,
        timeout: float | None,
    ) -> abc.Generator[Result, None, None]:
        deadline = _deadline(timeout)

        def prepare(index: int, conversation: object) -> Prepared:
            return self._prepare(index, conversation, options, numbered=True)

        with ProgressBar(total, enabled=progress) as bar:
            for wave in runner.prepared_waves(conversations, prepare, window):
                _raise_input_error(wave, on_error)
                pending: dict[int, tuple[_Waiter, Request]] = {}
                for item in _submission_order(wave):
                    waiter = _Waiter()
                    pending[item.index] = (waiter, Request(options, waiter, cap=cap, item=item))
                try:
                    requests = [request for _, request in pending.values()]
                    self._scheduler.submit(requests, wait_for_room=True)
                    for item in wave:
                        if item.error is not None:
                            result = Result.failed(item.error)
                        else:
                            waiter, request = pending[item.index]
                            result = _checked(
                                waiter.wait(request, deadline, timeout), item.index, on_error
                            )
                        bar.update([result])
                        yield result
                finally:
                    # Closed early, or raising: rows nobody will read stop now.
                    for _, request in pending.values():
                        request.cancel()

    # -- scoring ----------------------------------------------------------------

    def score(
        self,
        conversation: Conversation,
        choices: Sequence[str],
        *,
        timeout: float | None = None,
    ) -> list[ChoiceScore]:
        """How likely the model finds each candidate answer; one :class:`ChoiceScore` per choice.

        Nothing is generated: the prompt (images included) runs through the
        model once and every choice's tokens are scored on top of its KV
        cache, many choices per forward pass. ``logprob`` is the sum of the
        natural-log probabilities of the choice's tokens (the log-softmax of
        the model's raw logits), exactly as a forward pass of prompt + choice
        gives it. A choice is scored as the exact answer text (``"red"``, not
        ``" red"``); one the vocabulary cannot write raises
        :class:`~idefics_kit.InvalidParameterError` before any model work.
        Pick with ``max(scores, key=lambda s: s.logprob)`` (or
        ``mean_logprob`` to compare choices of different lengths).
        ``timeout`` (seconds, from this call) raises
        :class:`~idefics_kit.RequestTimeoutError` and stops the scoring at its
        next forward pass.
        """
        return self.score_batch([conversation], choices, timeout=timeout)[0]

    def score_batch(
        self,
        conversations: Iterable[Conversation],
        choices: Sequence[str] | Sequence[Sequence[str]],
        *,
        on_error: OnError = "raise",
        timeout: float | None = None,
    ) -> list[list[ChoiceScore]]:
        """:meth:`score` for many conversations: one list of scores per conversation, in order.

        ``choices`` is one list of strings for every conversation, or one list
        per conversation. Every conversation and choice is checked before any
        model work; with ``on_error="return"`` a conversation that fails
        (its input, or the model while scoring it) gets an empty list instead
        of raising. ``timeout`` counts from this call for the whole batch.
        """
        return self._scorer.score_all(
            list(conversations), choices, on_error, _deadline(timeout), timeout
        )

    async def ascore(
        self,
        conversation: Conversation,
        choices: Sequence[str],
        *,
        timeout: float | None = None,
    ) -> list[ChoiceScore]:
        """:meth:`score` for asyncio; the event loop is never blocked.

        The conversation is prepared in a worker thread and scored on the
        model's worker between decoding steps. Cancelling the awaiting task
        stops the scoring at its next forward pass (or before it starts).
        """
        return (await self.ascore_batch([conversation], choices, timeout=timeout))[0]

    async def ascore_batch(
        self,
        conversations: Iterable[Conversation],
        choices: Sequence[str] | Sequence[Sequence[str]],
        *,
        on_error: OnError = "raise",
        timeout: float | None = None,
    ) -> list[list[ChoiceScore]]:
        """:meth:`score_batch` for asyncio: same rules, one list of scores per conversation."""
        items = list(conversations)
        deadline = _deadline(timeout)
        gave_up = threading.Event()
        try:
            return await asyncio.to_thread(
                self._scorer.score_all, items, choices, on_error, deadline, timeout, gave_up
            )
        except BaseException:
            gave_up.set()  # the awaiting task was cancelled: the scoring stops
            raise

    def prompt_token_ids(self, conversation: Conversation) -> tuple[int, ...]:
        """The token ids the model reads for ``conversation``, before the answer.

        BOS and expanded image tokens included; ``len()`` of it is the
        ``usage.prompt_tokens`` that :meth:`generate` reports.
        """
        item = self._prepare(0, conversation, None, numbered=False)
        if item.error is not None or item.inputs is None:
            raise item.error or ConversationError("conversation could not be encoded")
        ids: list[int] = item.inputs["input_ids"][0].tolist()
        return tuple(ids)

    def _resolve(
        self, options: GenerationOptions | None, overrides: dict[str, Any]
    ) -> GenerationOptions:
        """The options of a call, with a grammar constraint compiled (cached) before model work."""
        resolved = _options(options, overrides)
        if resolved.constrained:
            vocab = vocabulary(
                self._adapter.tokenizer, logits_width(self.model, self._adapter.tokenizer)
            )
            structured.compile_constraint(vocab, self._adapter.stop_token_ids, resolved)
        return resolved

    def _prepare(
        self,
        index: int,
        conversation: object,
        options: GenerationOptions | None,
        *,
        numbered: bool,
    ) -> runner.Prepared:
        return runner.prepare(
            self._adapter,
            index,
            conversation,
            numbered=numbered,
            keep_images=self._cache is not None,
            context=self._context if options is not None else None,
            max_new_tokens=options.max_new_tokens if options is not None else 0,
        )


def _submission_order(wave: list[Prepared]) -> list[Prepared]:
    """The good items of a wave, grouped and longest first, so FIFO takes pad little."""
    good = [item for item in wave if item.error is None]
    batches = plan([i.length for i in good], [i.group for i in good], len(good) or 1)
    return [good[i] for batch in batches for i in reversed(batch)]


def _raise_input_error(wave: list[Prepared], on_error: OnError) -> None:
    if on_error == "raise":
        for item in wave:
            if item.error is not None:
                raise item.error


def _checked(result: Result, index: int, on_error: OnError) -> Result:
    if result.error is not None:
        result.error.at_index(index)
        if on_error == "raise":
            raise result.error
    return result


def _options(options: GenerationOptions | None, overrides: dict[str, Any]) -> GenerationOptions:
    if options is not None and not isinstance(options, GenerationOptions):
        raise InvalidParameterError(
            "options", f"options must be a GenerationOptions, got {type(options).__name__}", options
        )
    return (options or GenerationOptions()).with_overrides(overrides)
