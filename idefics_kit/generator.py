"""``Generator``: load a checkpoint once, answer conversations.

A thin facade: it validates input, decodes images, asks the family adapter
for model inputs and hands them to the engine. Calls on one Generator are
serialised by a lock, so a Generator may be shared between threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import abc
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Literal

import torch
from transformers import BatchFeature

from idefics_kit import engine, runner
from idefics_kit.conversation import Conversation
from idefics_kit.devices import DeviceLike, DTypeLike, resolve_device, resolve_dtype
from idefics_kit.errors import (
    ConversationError,
    InvalidParameterError,
    ModelLoadError,
    UsageError,
)
from idefics_kit.families import ADAPTERS, Family, FamilyAdapter, adapter_for
from idefics_kit.options import GenerationOptions
from idefics_kit.progress import ProgressBar
from idefics_kit.results import Result
from idefics_kit.runner import OnError
from idefics_kit.toy import TOY_MODEL
from idefics_kit.toy import checkpoint_path as toy_checkpoint_path
from idefics_kit.vision_cache import VisionCache, VisionCacheStats

__all__ = ["Generator"]

_DEFAULT_BATCH_SIZE = 8
DEFAULT_VISION_CACHE_MB = 256.0
BatchSize = int | Literal["auto"]


class Generator:
    """Answers :class:`Conversation` values with one IDEFICS-family model.

    Build it with :meth:`from_pretrained` (a hub id or a local folder) or
    :meth:`from_model` (objects the application already loaded).
    """

    def __init__(
        self, model: Any, processor: Any, adapter: FamilyAdapter, vision_cache_mb: float
    ) -> None:
        self.model = model
        self.processor = processor
        self._adapter = adapter
        self._cache = VisionCache(vision_cache_mb) if vision_cache_mb != 0 else None
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self._context: int | None = int(limit) if isinstance(limit, int) else None
        self._lock = threading.Lock()
        self._owner: int | None = None

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

        Weights load only from safetensors files: pickled ``.bin`` weights can
        run code while loading, so a checkpoint that has only those needs
        ``allow_pickle=True`` (for checkpoints you trust). Custom model code
        from a checkpoint (``trust_remote_code``) is never run.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        name = _resolve_name(os.fspath(model_id))
        target = resolve_device(device) if device_map is None else None
        torch_dtype = resolve_dtype(dtype, target or resolve_device("auto"))
        hub: dict[str, Any] = {
            "revision": revision,
            "token": token,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
        }
        if _looks_local(name) and not os.path.isdir(name):
            raise ModelLoadError(
                f"no checkpoint folder at {name!r}: pass an existing folder holding "
                "config.json, or a hub id such as 'HuggingFaceM4/idefics2-8b'"
            )
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=False, **hub)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a model config from {name!r}: {exc}") from exc
        adapter_cls = _adapter_class(config.model_type, name)
        try:
            processor = AutoProcessor.from_pretrained(name, trust_remote_code=False, **hub)
        except ImportError as exc:
            raise ModelLoadError(
                f"the {adapter_cls.family} processor of {name!r} needs packages that are not "
                f"installed: {exc}. Install them with: pip install 'idefics-kit[smolvlm]'"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the processor of {name!r}: {exc}") from exc
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                name,
                dtype=torch_dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                use_safetensors=None if allow_pickle else True,
                trust_remote_code=False,
                **hub,
            )
        except (OSError, ValueError) as exc:
            if not allow_pickle and _has_only_pickle_weights(name):
                raise ModelLoadError(
                    f"{name!r} has only pickled .bin weights and no safetensors; loading pickle "
                    "can run arbitrary code. Convert it to safetensors, or pass "
                    "allow_pickle=True if you trust this checkpoint"
                ) from exc
            raise ModelLoadError(f"cannot load the weights of {name!r}: {exc}") from exc
        if target is not None:
            model.to(target)
        model.eval()
        adapter = adapter_cls(processor, model.generation_config)
        return cls(model, processor, adapter, vision_cache_mb)

    @classmethod
    def from_model(
        cls, model: Any, processor: Any, *, vision_cache_mb: float = DEFAULT_VISION_CACHE_MB
    ) -> Generator:
        """Wrap a model and processor the application has already loaded.

        The model stays where it is (device, dtype) and is switched to eval mode.
        """
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        adapter_cls = _adapter_class(str(model_type), type(model).__name__)
        if getattr(processor, "tokenizer", None) is None:
            raise ModelLoadError(
                f"processor {type(processor).__name__} has no tokenizer; pass the model's "
                "AutoProcessor, not its image processor or tokenizer alone"
            )
        model.eval()
        adapter = adapter_cls(processor, model.generation_config)
        return cls(model, processor, adapter, vision_cache_mb)

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
            with self._exclusive():
                self._cache.clear()

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

    # -- generation ----------------------------------------------------------

    def generate(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        **overrides: Any,
    ) -> Result:
        """Answer the last user turn of ``conversation``.

        ``overrides`` are :class:`GenerationOptions` fields
        (``max_new_tokens=64``) applied on top of ``options``.
        """
        resolved = _options(options, overrides)
        item = self._prepare(0, conversation, resolved, numbered=False)
        with self._exclusive():
            results = runner.run_wave(
                self.model, self._adapter, [item], resolved, 1, "raise", cache=self._cache
            )
        return results[0]

    def generate_batch(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None = None,
        *,
        batch_size: BatchSize = _DEFAULT_BATCH_SIZE,
        on_error: OnError = "raise",
        progress: bool = False,
        **overrides: Any,
    ) -> list[Result]:
        """Answer many conversations; one :class:`Result` per input, in input order.

        Every conversation is checked, its images decoded and its prompt
        encoded before any model work. Conversations of similar prompt length
        then run together, ``batch_size`` at a time (``"auto"``: as many as fit
        in free GPU memory; 8 on the CPU), left-padded; an out-of-memory batch
        is split in half and retried. With greedy decoding, or sampling with a
        ``seed``, a conversation's answer does not depend on its batch.

        ``on_error="raise"`` raises the first bad input's error, its message
        starting with ``conversation <index>:``; ``"return"`` gives that input
        a :class:`Result` whose ``error`` says why and runs the rest.
        """
        items = list(conversations)
        return list(
            self._run(items, options, overrides, batch_size, on_error, progress, window=len(items))
        )

    def iter_batch(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None = None,
        *,
        batch_size: BatchSize = _DEFAULT_BATCH_SIZE,
        on_error: OnError = "raise",
        progress: bool = False,
        window: int | None = None,
        **overrides: Any,
    ) -> abc.Generator[Result, None, None]:
        """Like :meth:`generate_batch`, for jobs too large to hold in memory.

        Reads ``conversations`` lazily, ``window`` at a time (default: four
        batches, at least 32), and yields results in input order as each
        window finishes; the next window's images are decoded while the model
        works. A bad input is only found when its window is read, so with
        ``on_error="raise"`` earlier results may already have been yielded.
        """
        size = window if window is not None else max(32, 4 * _plain_batch_size(batch_size))
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidParameterError(
                "window", f"window must be an int >= 1, got {window!r}", window
            )
        return self._run(conversations, options, overrides, batch_size, on_error, progress, size)

    def stream(
        self,
        conversation: Conversation,
        options: GenerationOptions | None = None,
        **overrides: Any,
    ) -> abc.Generator[str, None, None]:
        """Yield the answer as text pieces, each as soon as it is final.

        ``"".join(gen.stream(conv, ...))`` equals ``gen.generate(conv, ...).text``.
        Closing the iterator early stops generation.
        """
        resolved = _options(options, overrides)
        item = self._prepare(0, conversation, resolved, numbered=False)
        if item.error is not None:
            raise item.error
        return self._stream(item, resolved)

    def _stream(
        self, item: runner.Prepared, options: GenerationOptions
    ) -> abc.Generator[str, None, None]:
        with self._exclusive():
            encoded: dict[str, Any] = dict(item.inputs or {})
            if self._cache is not None and item.images:
                encoded = runner.with_cached_features(
                    self.model, self._adapter, [item], encoded, self._cache
                )
            inputs = BatchFeature(encoded).to(self.device, dtype=self.dtype)
            yield from engine.stream(self.model, self._adapter, inputs, options)

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

    # -- internals -------------------------------------------------------------

    def _run(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions | None,
        overrides: dict[str, Any],
        batch_size: BatchSize,
        on_error: OnError,
        progress: bool,
        window: int,
    ) -> abc.Generator[Result, None, None]:
        # Arguments are checked here, eagerly, not when the iterator starts.
        resolved = _options(options, overrides)
        _check_batch_size(batch_size)
        if on_error not in ("raise", "return"):
            raise InvalidParameterError(
                "on_error", f"on_error must be 'raise' or 'return', got {on_error!r}", on_error
            )
        total = len(conversations) if isinstance(conversations, Sized) else None
        return self._results(conversations, resolved, batch_size, on_error, progress, window, total)

    def _results(
        self,
        conversations: Iterable[Conversation],
        options: GenerationOptions,
        batch_size: BatchSize,
        on_error: OnError,
        progress: bool,
        window: int,
        total: int | None,
    ) -> abc.Generator[Result, None, None]:
        def prepare(index: int, conversation: object) -> runner.Prepared:
            return self._prepare(index, conversation, options, numbered=True)

        with ProgressBar(total, enabled=progress) as bar:
            for wave in runner.prepared_waves(conversations, prepare, max(1, window)):
                size = self._batch_size(batch_size, wave, options)
                with self._exclusive():
                    results = runner.run_wave(
                        self.model,
                        self._adapter,
                        wave,
                        options,
                        size,
                        on_error,
                        bar.update,
                        cache=self._cache,
                    )
                yield from results

    def _batch_size(
        self, batch_size: BatchSize, wave: list[runner.Prepared], options: GenerationOptions
    ) -> int:
        if batch_size != "auto":
            return batch_size
        if self.device.type != "cuda":
            return runner.CPU_BATCH_SIZE
        free, _ = torch.cuda.mem_get_info(self.device)
        longest = max((item.length for item in wave), default=0) + options.max_new_tokens
        return runner.estimate_batch_size(
            self.model.config.get_text_config(), self.dtype, longest, free
        )

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

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise model work; refuse a nested call that would wait on itself."""
        me = threading.get_ident()
        if self._owner == me:
            raise UsageError(
                "this Generator is already generating in this thread (an unfinished stream?); "
                "exhaust or close() the stream before the next call"
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None


def _plain_batch_size(batch_size: BatchSize) -> int:
    return runner.CPU_BATCH_SIZE if batch_size == "auto" else batch_size


def _check_batch_size(batch_size: object) -> None:
    if batch_size == "auto":
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(
            "batch_size",
            f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}",
            batch_size,
        )


def _has_only_pickle_weights(name: str) -> bool:
    if not os.path.isdir(name):
        return False
    files = os.listdir(name)
    return any(f.endswith(".bin") for f in files) and not any(
        f.endswith(".safetensors") for f in files
    )


def _resolve_name(name: str) -> str:
    if name != TOY_MODEL:
        return name
    try:
        return os.fspath(toy_checkpoint_path())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"cannot load the built-in toy model: {exc}") from exc


def _looks_local(name: str) -> bool:
    # Hub ids are "owner/name"; anything path-like is meant as a folder.
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or os.path.exists(name)


def _adapter_class(model_type: str, name: str) -> type[FamilyAdapter]:
    adapter_cls = adapter_for(model_type)
    if adapter_cls is None:
        raise ModelLoadError(
            f"{name!r} is a {model_type!r} model, not an IDEFICS-family one; supported "
            f"model types: {', '.join(ADAPTERS)}"
        )
    return adapter_cls


def _options(options: GenerationOptions | None, overrides: dict[str, Any]) -> GenerationOptions:
    if options is not None and not isinstance(options, GenerationOptions):
        raise InvalidParameterError(
            "options", f"options must be a GenerationOptions, got {type(options).__name__}", options
        )
    return (options or GenerationOptions()).with_overrides(overrides)
