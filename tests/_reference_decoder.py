"""The stream decoder before issue 19, kept verbatim as the oracle for idefics_kit.detokenize.

It decodes the whole answer again at every token (quadratic); tests/test_detokenize.py
checks that the incremental TextDecoder emits exactly its pieces, and
benchmarks/bench_detokenize.py measures both.
"""

from __future__ import annotations

from collections.abc import Sequence

from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions

__all__ = ["ReferenceTextDecoder"]


class ReferenceTextDecoder:
    def __init__(self, adapter: FamilyAdapter, options: GenerationOptions) -> None:
        self.adapter = adapter
        self.stop = options.stop
        self.limit = options.max_new_tokens
        self.stop_ids = set(adapter.stop_token_ids)
        self.byte_ids = adapter.byte_token_ids
        self.ids: list[int] = []
        self.emitted = ""
        self.ended = False

    def feed(self, tokens: Sequence[int]) -> str:
        if self.ended:
            return ""
        for token in tokens:
            if token in self.stop_ids or len(self.ids) >= self.limit:
                self.ended = True
                break
            self.ids.append(token)
        end = len(self.ids)
        while end and self.ids[end - 1] in self.byte_ids:
            end -= 1
        safe = _safe_text(self.adapter.decode(self.ids[:end]), self.stop)
        if safe is None:
            self.ended = True
            return ""
        if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
            piece, self.emitted = safe[len(self.emitted) :], safe
            return piece
        return ""

    def rest(self, final_text: str) -> str:
        return final_text[len(self.emitted) :] if len(final_text) > len(self.emitted) else ""


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _safe_text(text: str, stop: tuple[str, ...]) -> str | None:
    if stop and _find_stop(text, stop) is not None:
        return None
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:size]):
                hold = size
                break
    return text[: len(text) - hold]
