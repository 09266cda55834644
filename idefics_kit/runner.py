"""Preparing conversations, and turning prepared ones into model inputs.

:func:`prepare` checks, decodes and encodes one conversation on its own (so
a bad one fails alone and its exact prompt length is known before the model
runs). :func:`prepared_waves` reads a large job in waves, preparing the next
wave while the model works on the current one. :class:`ModelInputs` collates
the rows the engine admits together (vision cache included).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import BatchFeature

from idefics_kit.batching import collate, encoding_group
from idefics_kit.conversation import Conversation
from idefics_kit.errors import (
    ConversationError,
    IdeficsKitError,
)
from idefics_kit.families.base import FamilyAdapter, Pixels
from idefics_kit.vision_cache import VisionCache, image_key

__all__ = [
    "CPU_BATCH_SIZE",
    "ModelInputs",
    "OnError",
    "Prepared",
    "estimate_batch_size",
    "prepare",
    "prepared_waves",
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
    images: tuple[tuple[str, Pixels], ...] = ()
    """(content key, processed pixels) per image, kept only when a vision cache is on.

    The pixels are views into ``inputs``: the image processor runs once per
    image, and a cache miss encodes these instead of processing the image again.
    """

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

    ``numbered`` marks a captured error with ``index`` (a batch item). With ``context`` (the model's position limit), a prompt that leaves no room
    for ``max_new_tokens`` is an error: rotary models would run past their
    context silently and produce garbage.
    """
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
        kept: tuple[tuple[str, Pixels], ...] = ()
        if keep_images and images:
            pixels = adapter.split_pixels(encoded, len(images))
            kept = tuple((image_key(image), own) for image, own in zip(images, pixels, strict=True))
        return Prepared(index=index, inputs=dict(encoded), error=None, images=kept)
    except IdeficsKitError as exc:
        if numbered:
            exc.at_index(index)
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


class ModelInputs:
    """Turns prepared conversations into one left-padded batch of model inputs on the model's device.

    With the vision cache, image pixels are replaced by cached (or newly
    computed) encoder features, one encoder call for all new images.
    """

    def __init__(self, model: Any, adapter: FamilyAdapter, cache: VisionCache | None) -> None:
        self.model = model
        self.adapter = adapter
        self.cache = cache

    def __call__(self, items: Sequence[Prepared]) -> BatchFeature:
        cached = self.cache is not None and any(item.images for item in items)
        # With the cache, pixels are replaced by features: padding and copying
        # them into one batch tensor first would be wasted work.
        skip = self.adapter.replaced_by_features if cached else ()
        encoded: dict[str, Any] = collate(
            [
                {k: v for k, v in item.inputs.items() if k not in skip}
                for item in items
                if item.inputs
            ],
            self.adapter.sequence_keys,
        )
        if cached:
            encoded = self.with_cached_features(items, encoded)
        return BatchFeature(encoded).to(self.model.device, dtype=self.model.dtype)

    def with_cached_features(
        self, items: Sequence[Prepared], encoded: dict[str, Any]
    ) -> dict[str, Any]:
        """``encoded`` with image pixels replaced by cached (or newly computed) features."""
        assert self.cache is not None
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Pixels] = {}
        for item in items:
            for key, pixels in item.images:
                if key in found or key in missing:
                    continue
                cached = self.cache.get(key)
                if cached is None:
                    missing[key] = pixels
                else:
                    found[key] = cached
        if missing:
            # One encoder call for all new images of the micro-batch.
            with torch.inference_mode():
                computed = self.adapter.image_features(self.model, list(missing.values()))
            for key, value in zip(missing, computed, strict=True):
                self.cache.put(key, value)
                found[key] = value
        per_item = [[found[key] for key, _ in item.images] for item in items]
        return self.adapter.with_image_features(self.model, encoded, per_item)
