"""Device and dtype resolution: one place that decides where a model runs."""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch

from idefics_kit.errors import DeviceError, InvalidParameterError

__all__ = ["DTypeLike", "DTypeName", "DeviceLike", "resolve_device", "resolve_dtype"]

DTypeName = Literal["auto", "bfloat16", "float16", "float32"]
DeviceLike: TypeAlias = "str | torch.device"
DTypeLike: TypeAlias = "DTypeName | torch.dtype"

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: DeviceLike) -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a device into one.

    ``"auto"`` picks CUDA, then MPS, then the CPU. A device that this machine
    does not have raises :class:`DeviceError`.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidParameterError(
            "device",
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device; got {device!r}",
            device,
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(resolved)!r} was requested but CUDA is not available on this machine; "
                "use device='cpu' or device='auto'"
            )
        count = torch.cuda.device_count()
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= count:
            raise DeviceError(
                f"device {str(resolved)!r} was requested but this machine has {count} CUDA "
                f"device(s): cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    if resolved.type == "mps" and not _mps_available():
        raise DeviceError("device 'mps' was requested but MPS is not available on this machine")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(
            f"device type {resolved.type!r} is not supported; use 'cpu', 'cuda' or 'mps'"
        )
    return resolved


def resolve_dtype(dtype: DTypeLike, device: torch.device) -> torch.dtype:
    """Turn ``"auto"``, a dtype name or a ``torch.dtype`` into the dtype to load weights in.

    ``"auto"``: bfloat16 on CUDA devices that support it, else float16 on CUDA
    and MPS; float32 on the CPU.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InvalidParameterError(
                "dtype", f"dtype must be one of {', '.join(_DTYPES)} or 'auto'; got {dtype}", dtype
            )
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidParameterError(
        "dtype",
        f"dtype must be 'auto', one of {', '.join(_DTYPES)} or a torch.dtype; got {dtype!r}",
        dtype,
    )
