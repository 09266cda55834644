"""``GET /metrics``: Prometheus text exposition format (version 0.0.4), written by hand.

Eight metric families do not need a client library: :class:`Metrics` keeps
counters and one latency histogram per route and renders them, next to a
snapshot of the engine's ``Generator.stats()``, as text Prometheus scrapes.
Every update happens on the event loop's thread; a lock keeps them consistent
anyway, should an application update them from elsewhere.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
"""Upper bounds (seconds) of the request latency histogram; ``+Inf`` is added."""

_PREFIX = "idefics_kit"
# Engine stats fields -> (metric name, type, help); absent fields are skipped.
_ENGINE_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("queued", "engine_queued_requests", "gauge", "Requests waiting for a batch slot."),
    ("running", "engine_running_requests", "gauge", "Requests being decoded now."),
    ("batches", "engine_batches_total", "counter", "Decoding batches started by the engine."),
    ("mean_batch_size", "engine_mean_batch_size", "gauge", "Mean rows per decoding batch."),
    ("rows", "engine_rows_total", "counter", "Rows (requests) run in those batches."),
    ("completed", "engine_completed_total", "counter", "Requests the engine answered."),
    ("cancelled", "engine_cancelled_total", "counter", "Requests given up by their callers."),
    ("generated_tokens", "engine_generated_tokens_total", "counter", "Tokens generated."),
    ("tokens_per_second", "engine_tokens_per_second", "gauge", "Recent generation throughput."),
)


class _Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.buckets = [0] * len(bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, bounds: Sequence[float], value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(bounds):
            if value <= bound:
                self.buckets[index] += 1


class Metrics:
    """Request counters, token counters and latency histograms of one server."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._bounds = tuple(buckets)
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._first_token = _Histogram(self._bounds)
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._finish: dict[str, int] = defaultdict(int)
        self.in_flight = 0

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and observe its latency."""
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            histogram = self._latency.get(route)
            if histogram is None:
                histogram = self._latency[route] = _Histogram(self._bounds)
            histogram.observe(self._bounds, seconds)

    def completion_done(self, prompt_tokens: int, completion_tokens: int, finish: str) -> None:
        """Count the tokens and finish reason of one answered chat completion."""
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens
            self._finish[finish] += 1

    def first_token(self, seconds: float) -> None:
        """Observe a stream's time to its first piece."""
        with self._lock:
            self._first_token.observe(self._bounds, seconds)

    def render(self, engine: object | None = None) -> str:
        """The exposition text; ``engine`` is a ``Generator.stats()`` value (or None)."""
        lines: list[str] = []
        with self._lock:
            _family(
                lines,
                "http_requests_total",
                "counter",
                "HTTP requests by method, route and status.",
            )
            for (method, route, status), count in sorted(self._requests.items()):
                lines.append(
                    f"{_PREFIX}_http_requests_total"
                    f"{_labels(method=method, route=route, status=status)} {count}"
                )
            _family(
                lines,
                "http_requests_in_flight",
                "gauge",
                "Requests being answered (not counting /health and /metrics).",
            )
            lines.append(f"{_PREFIX}_http_requests_in_flight {self.in_flight}")
            _family(
                lines,
                "http_request_duration_seconds",
                "histogram",
                "Time from the request's arrival to the end of its response.",
            )
            for route, histogram in sorted(self._latency.items()):
                lines.extend(
                    self._histogram("http_request_duration_seconds", histogram, route=route)
                )
            _family(
                lines,
                "time_to_first_token_seconds",
                "histogram",
                "Streamed chat completions: time from arrival to the first text piece.",
            )
            lines.extend(self._histogram("time_to_first_token_seconds", self._first_token))
            _family(lines, "prompt_tokens_total", "counter", "Prompt tokens of answered requests.")
            lines.append(f"{_PREFIX}_prompt_tokens_total {self._prompt_tokens}")
            _family(
                lines,
                "completion_tokens_total",
                "counter",
                "Completion tokens of answered requests.",
            )
            lines.append(f"{_PREFIX}_completion_tokens_total {self._completion_tokens}")
            _family(lines, "completions_total", "counter", "Answered requests by finish reason.")
            for reason, count in sorted(self._finish.items()):
                lines.append(f"{_PREFIX}_completions_total{_labels(finish_reason=reason)} {count}")
        if engine is not None:
            for attribute, name, kind, help_text in _ENGINE_FIELDS:
                value = getattr(engine, attribute, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    _family(lines, name, kind, help_text)
                    lines.append(f"{_PREFIX}_{name} {_number(value)}")
        return "\n".join(lines) + "\n"

    def _histogram(self, name: str, histogram: _Histogram, **labels: str) -> Iterable[str]:
        for bound, count in zip(self._bounds, histogram.buckets, strict=True):
            yield f"{_PREFIX}_{name}_bucket{_labels(**labels, le=_number(bound))} {count}"
        yield f"{_PREFIX}_{name}_bucket{_labels(**labels, le='+Inf')} {histogram.count}"
        yield f"{_PREFIX}_{name}_sum{_labels(**labels)} {_number(histogram.total)}"
        yield f"{_PREFIX}_{name}_count{_labels(**labels)} {histogram.count}"


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {_PREFIX}_{name} {help_text}")
    lines.append(f"# TYPE {_PREFIX}_{name} {kind}")


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
