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
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from idefics_kit import engine
from idefics_kit.conversation import Conversation
from idefics_kit.devices import DeviceLike, DTypeLike, resolve_device, resolve_dtype
from idefics_kit.errors import (
    ConversationError,
    ImageLoadError,
    InvalidParameterError,
    ModelLoadError,
    UsageError,
)
from idefics_kit.families import ADAPTERS, Family, FamilyAdapter, adapter_for
from idefics_kit.families.base import LoadedImages
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result

__all__ = ["Generator"]

_DEFAULT_BATCH_SIZE = 8


class Generator:
    """Answers :class:`Conversation` values with one IDEFICS-family model.

    Build it with :meth:`from_pretrained` (a hub id or a local folder) or
    :meth:`from_model` (objects the application already loaded).
    """

    def __init__(self, model: Any, processor: Any, adapter: FamilyAdapter) -> None:
        self.model = model
        self.processor = processor
        self._adapter = adapter
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
    ) -> Generator:
        """Load a checkpoint of any supported family from the hub or a folder.

        ``device="auto"`` picks CUDA, then MPS, then the CPU; ``dtype="auto"``
        picks bfloat16 (float16 where unsupported) on CUDA and float32 on the
        CPU. ``device_map`` (e.g. ``"auto"``) hands placement to accelerate
        instead, for models spread over several GPUs.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        name = os.fspath(model_id)
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
            config = AutoConfig.from_pretrained(name, **hub)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load a model config from {name!r}: {exc}") from exc
        adapter_cls = _adapter_class(config.model_type, name)
        try:
            processor = AutoProcessor.from_pretrained(name, **hub)
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
                **hub,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the weights of {name!r}: {exc}") from exc
        if target is not None:
            model.to(target)
        model.eval()
        return cls(model, processor, adapter_cls(processor, model.generation_config))

    @classmethod
    def from_model(cls, model: Any, processor: Any) -> Generator:
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
        return cls(model, processor, adapter_cls(processor, model.generation_config))

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
        return self.generate_batch([conversation], options, batch_size=1, **overrides)[0]

    def generate_batch(
        self,
        conversations: Sequence[Conversation],
        options: GenerationOptions | None = None,
        *,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        **overrides: Any,
    ) -> list[Result]:
        """Answer many conversations; one :class:`Result` per input, in input order.

        Conversations run ``batch_size`` at a time, left-padded. Every
        conversation is checked and every image decoded before any model
        work, so bad input fails fast. With greedy decoding a conversation's
        answer does not depend on the batch it ran in.
        """
        resolved = _options(options, overrides)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidParameterError(
                "batch_size", f"batch_size must be an int >= 1, got {batch_size!r}", batch_size
            )
        items = list(conversations)
        images = self._prepare(items)
        results: list[Result] = []
        with self._exclusive():
            for start in range(0, len(items), batch_size):
                stop = start + batch_size
                inputs = self._encode(items[start:stop], images[start:stop])
                results.extend(engine.generate(self.model, self._adapter, inputs, resolved))
        return results

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
        images = self._prepare([conversation])
        return self._stream(conversation, images[0], resolved)

    def _stream(
        self, conversation: Conversation, images: LoadedImages, options: GenerationOptions
    ) -> abc.Generator[str, None, None]:
        with self._exclusive():
            inputs = self._encode([conversation], [images])
            yield from engine.stream(self.model, self._adapter, inputs, options)

    def prompt_token_ids(self, conversation: Conversation) -> tuple[int, ...]:
        """The token ids the model reads for ``conversation``, before the answer.

        BOS and expanded image tokens included; ``len()`` of it is the
        ``usage.prompt_tokens`` that :meth:`generate` reports.
        """
        images = self._prepare([conversation])
        inputs = self._adapter.encode([conversation], images)
        ids: list[int] = inputs["input_ids"][0].tolist()
        return tuple(ids)

    # -- internals -------------------------------------------------------------

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

    def _prepare(self, conversations: Sequence[Conversation]) -> list[list[Any]]:
        """Check every conversation and decode every image, before any model work."""
        for index, conversation in enumerate(conversations):
            with _naming_input(index, len(conversations)):
                if not isinstance(conversation, Conversation):
                    raise ConversationError(
                        f"expected a Conversation, got {type(conversation).__name__}; "
                        "build one with Conversation().user(...)"
                    )
                conversation.validate()
                self._adapter.check(conversation)
        images = []
        for index, conversation in enumerate(conversations):
            with _naming_input(index, len(conversations)):
                images.append([part.load() for part in conversation.images()])
        return images

    def _encode(self, conversations: Sequence[Conversation], images: Sequence[LoadedImages]) -> Any:
        inputs = self._adapter.encode(conversations, images)
        return inputs.to(self.device, dtype=self.dtype)


@contextlib.contextmanager
def _naming_input(index: int, count: int) -> Iterator[None]:
    """In a batch, prefix input errors with the index of the conversation at fault."""
    try:
        yield
    except ImageLoadError as exc:
        if count == 1:
            raise
        raise ImageLoadError(f"conversation {index}: {exc}", source=exc.source) from exc
    except ConversationError as exc:
        if count == 1:
            raise
        raise ConversationError(f"conversation {index}: {exc}") from exc


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
