"""A bounded LRU cache of vision-encoder outputs, keyed by image content.

Asking several questions about the same picture should run the vision encoder
for it once. Entries are the encoder's per-image output on the model's device;
the key is a SHA-256 of the decoded RGB pixels, so the same picture given as a
path, bytes or a PIL image is one entry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from idefics_kit.errors import InvalidParameterError

__all__ = ["VisionCache", "VisionCacheStats", "image_key"]


@dataclass(frozen=True, slots=True, kw_only=True)
class VisionCacheStats:
    """What the vision cache holds and how often it was used."""

    hits: int
    misses: int
    entries: int
    megabytes: float
    max_megabytes: float


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image (mode, size and pixels)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class VisionCache:
    """Least-recently-used map from image key to encoder output, at most ``max_mb``."""

    def __init__(self, max_mb: float) -> None:
        if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0:
            raise InvalidParameterError(
                "vision_cache_mb", f"vision_cache_mb must be a number >= 0, got {max_mb!r}", max_mb
            )
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached value for ``key``, computing and storing it on a miss."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def get(self, key: str) -> torch.Tensor | None:
        """The cached value for ``key`` (counted as a hit or a miss)."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store ``value``; the least recently used entries make room for it."""
        size = value.numel() * value.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> VisionCacheStats:
        """Counters and size now."""
        return VisionCacheStats(
            hits=self.hits,
            misses=self.misses,
            entries=len(self._entries),
            megabytes=self._bytes / 2**20,
            max_megabytes=self.max_bytes / 2**20,
        )
