"""An optional progress bar for batch jobs (conversations, conv/s, tokens/s)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from idefics_kit.results import Result

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar on stderr when ``enabled``; otherwise does nothing."""

    def __init__(self, total: int | None, *, enabled: bool) -> None:
        self._bar: Any = None
        self._tokens = 0
        self._start = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="conv", desc="idefics-kit", dynamic_ncols=True)

    def update(self, results: list[Result]) -> None:
        """Count a finished micro-batch."""
        if self._bar is None:
            return
        self._tokens += sum(r.usage.completion_tokens for r in results)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix(tokens_per_s=f"{self._tokens / elapsed:.1f}", refresh=False)
        self._bar.update(len(results))

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
