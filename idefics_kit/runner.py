"""Batch execution: prepare conversations, plan micro-batches, run, keep order.

A job is read in waves of at most ``window`` conversations. While the model
works on one wave, a small thread pool decodes the images of the next, so at
most two waves of decoded inputs are held at a time. Inside a wave,
conversations are grouped by prompt length (known exactly, since each one is
encoded on its own first); results come back in input order whatever the
grouping. An out-of-memory micro-batch is split in half and retried, down to
one conversation.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from transformers import BatchFeature

from idefics_kit import engine
from idefics_kit.batching import collate, encoding_group, plan
from idefics_kit.conversation import Conversation
from idefics_kit.errors import (
    ConversationError,
    GenerationError,
    IdeficsKitError,
    ImageLoadError,
)
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result
from idefics_kit.vision_cache import VisionCache, image_key

__all__ = [
    "CPU_BATCH_SIZE",
    "OnError",
    "Prepared",
    "estimate_batch_size",
    "prepare",
    "prepared_waves",
    "run_wave",
]

OnError = Literal["raise", "return"]
CPU_BATCH_SIZE = 8
"""``batch_size="auto"`` off CUDA: a CPU gains little from larger batches."""
_MAX_AUTO_BATCH = 256
_MEMORY_HEADROOM = 0.6
"""Share of free GPU memory that ``batch_size="auto"`` plans to use."""


@dataclass(slots=True)
class Prepared:
    """One conversation, encoded on the CPU (or the error that stopped it)."""

    index: int
    inputs: dict[str, torch.Tensor] | None
    error: IdeficsKitError | None
    images: tuple[tuple[str, Image.Image], ...] = ()
    """(content key, decoded image) pairs, kept only when a vision cache is on."""

    @property
    def length(self) -> int:
        """Prompt tokens (0 for a failed item)."""
        return 0 if self.inputs is None else int(self.inputs["attention_mask"].sum())

    @property
    def group(self) -> tuple[str, ...]:
        """Items of one group can share a micro-batch (same input keys)."""
        return () if self.inputs is None else encoding_group(self.inputs)


def prepare(
    adapter: FamilyAdapter,
    index: int,
    conversation: object,
    *,
    numbered: bool,
    keep_images: bool = False,
    context: int | None = None,
    max_new_tokens: int = 0,
) -> Prepared:
    """Check, decode and encode one conversation; input errors are captured, not raised.

    With ``context`` (the model's position limit), a prompt that leaves no room
    for ``max_new_tokens`` is an error: rotary models would run past their
    context silently and produce garbage.
    """
    try:
        try:
            if not isinstance(conversation, Conversation):
                raise ConversationError(
                    f"expected a Conversation, got {type(conversation).__name__}; "
                    "build one with Conversation().user(...)"
                )
            conversation.validate()
            adapter.check(conversation)
            images = [part.load() for part in conversation.images()]
            try:
                encoded = adapter.encode([conversation], [images])
            except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:
                raise ConversationError(
                    f"the {adapter.family} processor could not encode this conversation: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            length = int(encoded["attention_mask"].sum())
            if context is not None and length + max_new_tokens > context:
                raise ConversationError(
                    f"the prompt is {length} tokens and max_new_tokens is {max_new_tokens}: "
                    f"{length + max_new_tokens} tokens exceed the model's context of {context} "
                    "(max_position_embeddings); shorten the conversation, use fewer or smaller "
                    "images, or lower max_new_tokens"
                )
            kept = tuple((image_key(image), image) for image in images) if keep_images else ()
            return Prepared(index=index, inputs=dict(encoded), error=None, images=kept)
        except ImageLoadError as exc:
            if not numbered:
                raise
            raise ImageLoadError(f"conversation {index}: {exc}", source=exc.source) from exc
        except ConversationError as exc:
            if not numbered:
                raise
            raise ConversationError(f"conversation {index}: {exc}") from exc
    except IdeficsKitError as exc:
        return Prepared(index=index, inputs=None, error=exc)


def prepared_waves(
    source: Iterable[object],
    prepare_one: Callable[[int, object], Prepared],
    window: int,
) -> Iterator[list[Prepared]]:
    """Waves of at most ``window`` prepared items, in input order.

    The first wave is prepared in the calling thread. Each later one is
    prepared by two short-lived threads while the caller runs the model on the
    wave before. The threads exit as soon as their wave is done: idle threads
    that ran torch ops keep their OpenMP workers alive, and on a small CPU
    those measurably slow the model down (benchmarks/diagnose_batching.py).
    """
    numbered = enumerate(source)

    def read() -> list[tuple[int, object]]:
        return list(itertools.islice(numbered, window))

    def in_background(
        items: list[tuple[int, object]],
    ) -> tuple[ThreadPoolExecutor, list[Future[Prepared]]]:
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="idefics-kit-prepare")
        futures = [pool.submit(prepare_one, index, item) for index, item in items]
        pool.shutdown(wait=False)  # the threads exit once the queue is drained
        return pool, futures

    wave = [prepare_one(index, item) for index, item in read()]
    upcoming: tuple[ThreadPoolExecutor, list[Future[Prepared]]] | None = None
    try:
        while wave:
            following = read()
            upcoming = in_background(following) if following else None
            yield wave
            wave = [future.result() for future in upcoming[1]] if upcoming else []
            upcoming = None
    finally:
        if upcoming is not None:
            # Closed early: drop queued work nobody will read.
            upcoming[0].shutdown(wait=False, cancel_futures=True)


def estimate_batch_size(
    text_config: Any, dtype: torch.dtype, longest_tokens: int, free_bytes: int
) -> int:
    """How many sequences of ``longest_tokens`` fit in ``free_bytes`` of GPU memory.

    Counts the KV cache (2 x layers x kv heads x head dim per token) and the
    hidden states of the prefill, with headroom for the vision encoder and
    allocator slack; out-of-memory splitting covers a wrong guess.
    """
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    layers = int(text_config.num_hidden_layers)
    width = dtype.itemsize
    kv_per_token = 2 * layers * kv_heads * head_dim * width
    activations_per_token = 4 * int(text_config.hidden_size) * width
    per_sequence = max(1, longest_tokens) * (kv_per_token + activations_per_token)
    return max(1, min(_MAX_AUTO_BATCH, int(free_bytes * _MEMORY_HEADROOM) // per_sequence))


def run_wave(
    model: Any,
    adapter: FamilyAdapter,
    items: list[Prepared],
    options: GenerationOptions,
    batch_size: int,
    on_error: OnError,
    on_batch: Callable[[list[Result]], None] | None = None,
    cache: VisionCache | None = None,
) -> list[Result]:
    """Results for ``items`` in their order; raises the first input error unless returning."""
    results: dict[int, Result] = {}
    for item in items:
        if item.error is not None:
            if on_error == "raise":
                raise item.error
            results[item.index] = Result.failed(item.error)
    good = [item for item in items if item.error is None]
    for batch in plan([i.length for i in good], [i.group for i in good], batch_size):
        members = [good[i] for i in batch]
        outputs = _run_micro_batch(model, adapter, members, options, on_error, cache)
        for item, result in zip(members, outputs, strict=True):
            results[item.index] = result
        if on_batch is not None:
            on_batch(outputs)
    return [results[item.index] for item in items]


def _run_micro_batch(
    model: Any,
    adapter: FamilyAdapter,
    items: list[Prepared],
    options: GenerationOptions,
    on_error: OnError,
    cache: VisionCache | None,
) -> list[Result]:
    encoded: dict[str, Any] = collate(
        [item.inputs for item in items if item.inputs], adapter.sequence_keys
    )
    if cache is not None and any(item.images for item in items):
        encoded = with_cached_features(model, adapter, items, encoded, cache)
    inputs = BatchFeature(encoded).to(model.device, dtype=model.dtype)
    try:
        return engine.generate(model, adapter, inputs, options)
    except torch.OutOfMemoryError as exc:
        del inputs
        _release_memory()
        if len(items) > 1:
            return _split(model, adapter, items, options, on_error, cache)
        if on_error == "raise":
            raise
        return [
            Result.failed(GenerationError(f"conversation {items[0].index}: out of memory: {exc}"))
        ]
    except GenerationError as exc:
        if on_error == "raise":
            indices = ", ".join(str(item.index) for item in items)
            raise GenerationError(f"conversation(s) {indices}: {exc}") from exc
        if len(items) > 1:
            return _split(model, adapter, items, options, on_error, cache)
        return [Result.failed(GenerationError(f"conversation {items[0].index}: {exc}"))]


def _split(
    model: Any,
    adapter: FamilyAdapter,
    items: list[Prepared],
    options: GenerationOptions,
    on_error: OnError,
    cache: VisionCache | None,
) -> list[Result]:
    half = len(items) // 2
    first = _run_micro_batch(model, adapter, items[:half], options, on_error, cache)
    return first + _run_micro_batch(model, adapter, items[half:], options, on_error, cache)


def with_cached_features(
    model: Any,
    adapter: FamilyAdapter,
    items: list[Prepared],
    encoded: dict[str, Any],
    cache: VisionCache,
) -> dict[str, Any]:
    """``encoded`` with image pixels replaced by cached (or newly computed) features."""

    found: dict[str, torch.Tensor] = {}
    missing: dict[str, Image.Image] = {}
    for item in items:
        for key, image in item.images:
            if key in found or key in missing:
                continue
            cached = cache.get(key)
            if cached is None:
                missing[key] = image
            else:
                found[key] = cached
    if missing:
        # One encoder call for all new images of the micro-batch.
        with torch.inference_mode():
            computed = adapter.image_features(model, list(missing.values()))
        for key, value in zip(missing, computed, strict=True):
            cache.put(key, value)
            found[key] = value
    per_item = [[found[key] for key, _ in item.images] for item in items]
    return adapter.with_image_features(model, encoded, per_item)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
