"""Loading a checkpoint: hub or folder, dtype and device, weight-format policy.

One job: turn a model id (a hub id, a folder, or ``"toy"``) into a model and
its processor, the way every entry point loads (``Generator.from_pretrained``,
the CLI, the server, Ray actors). ``Generator`` wraps what this returns.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

from idefics_kit.devices import DeviceLike, DTypeLike, resolve_device, resolve_dtype
from idefics_kit.errors import ModelLoadError
from idefics_kit.families import ADAPTERS, FamilyAdapter, adapter_for
from idefics_kit.toy import TOY_MODEL
from idefics_kit.toy import checkpoint_path as toy_checkpoint_path

__all__ = ["adapter_class", "load_pretrained", "peft_quietly"]


def load_pretrained(
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
    allow_pickle: bool = False,
    adapter: str | os.PathLike[str] | None = None,
    quantization_config: Any = None,
) -> tuple[Any, Any]:
    """The model (eval mode not yet set) and processor of ``model_id``; see ``Generator.from_pretrained``.

    ``adapter``: a LoRA adapter folder (``idefics-kit finetune``'s output,
    or any peft adapter saved as safetensors) applied to the base model and
    merged into its weights. ``model_id`` may itself be an adapter folder: its
    ``adapter_config.json`` names the base model, which is loaded first.
    ``quantization_config`` is passed to transformers (QLoRA training).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    name = os.fspath(model_id)
    if adapter is None and _is_adapter_folder(name):
        adapter, name = name, _adapter_base(name)
    name = _resolve_name(name)
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
    adapter_cls = adapter_class(config.model_type, name)
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
            **({"quantization_config": quantization_config} if quantization_config else {}),
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
    if target is not None and quantization_config is None:
        model.to(target)
    if adapter is not None:
        model = _with_adapter(model, os.fspath(adapter), allow_pickle=allow_pickle)
    return model, processor


ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Silence peft's use of a transformers attribute deprecated in v5 (its warning, not ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def _is_adapter_folder(name: str) -> bool:
    return os.path.isfile(os.path.join(name, ADAPTER_CONFIG)) and not os.path.isfile(
        os.path.join(name, "config.json")
    )


def _adapter_base(folder: str) -> str:
    """The base model an adapter folder records (``base_model_name_or_path``)."""
    import json

    path = os.path.join(folder, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the adapter config {path!r}: {exc}") from exc
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(
            f"the adapter folder {folder!r} does not record its base model "
            "(base_model_name_or_path in adapter_config.json); load it with "
            "from_pretrained(BASE_MODEL, adapter=FOLDER)"
        )
    return base


def _with_adapter(model: Any, folder: str, *, allow_pickle: bool) -> Any:
    """``model`` with the LoRA adapter in ``folder`` merged into its weights."""
    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        raise ModelLoadError(
            f"no LoRA adapter at {folder!r}: expected a folder holding {ADAPTER_CONFIG} "
            "(the output of 'idefics-kit finetune' without --merge or --full)"
        )
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not allow_pickle and not os.path.isfile(weights):
        raise ModelLoadError(
            f"the adapter folder {folder!r} has no adapter_model.safetensors; pickled "
            "adapter weights can run code while loading. Convert them to safetensors, or "
            "pass allow_pickle=True if you trust this adapter"
        )
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelLoadError(
            f"loading the LoRA adapter {folder!r} needs peft, which is not installed: "
            "pip install 'idefics-kit[train]'"
        ) from exc
    try:
        with peft_quietly():
            with_adapter = PeftModel.from_pretrained(model, folder, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot apply the LoRA adapter {folder!r}: {exc}") from exc
    # Merged once here, generation runs the plain model: no adapter cost per token.
    return with_adapter.merge_and_unload()


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


def adapter_class(model_type: str, name: str) -> type[FamilyAdapter]:
    adapter_cls = adapter_for(model_type)
    if adapter_cls is None:
        raise ModelLoadError(
            f"{name!r} is a {model_type!r} model, not an IDEFICS-family one; supported "
            f"model types: {', '.join(ADAPTERS)}"
        )
    return adapter_cls
