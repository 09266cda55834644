"""``GET /metrics``: Prometheus text exposition, written by ``prometheus_client``.

:class:`Metrics` keeps one server's counters and histograms in its own
``CollectorRegistry`` (never the process-global one, so two apps in one
process do not mix), next to a collector that reports a snapshot of the
engine's ``Generator.stats()`` at scrape time.

Every label value comes from a fixed set, so no client can add series: the
HTTP method is one of :data:`METHODS` or ``other``, the route is the template
of the route that matched (``/v1/models/{model}``) or ``other``, and the
status is a three-digit code the server chose.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from idefics_kit.results import Timing

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "METHODS", "STAGES", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
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
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
"""HTTP methods counted under their own name; any other is counted as ``other``."""
STAGES = ("prepare", "queue", "prefill", "decode")
"""The ``stage`` label values of the engine's per-request stage histogram (``Result.timing``)."""

_PREFIX = "idefics_kit"
# Engine stats fields -> (metric name, type, help); absent fields are skipped.
_ENGINE_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("queued", "engine_queued_requests", "gauge", "Requests waiting for a batch slot."),
    ("running", "engine_running_requests", "gauge", "Requests being decoded now."),
    ("batches", "engine_batches", "counter", "Decoding batches started by the engine."),
    ("mean_batch_size", "engine_mean_batch_size", "gauge", "Mean rows per decoding batch."),
    ("rows", "engine_rows", "counter", "Rows (requests) run in those batches."),
    ("completed", "engine_completed", "counter", "Requests the engine answered."),
    ("cancelled", "engine_cancelled", "counter", "Requests given up by their callers."),
    ("generated_tokens", "engine_generated_tokens", "counter", "Tokens generated."),
    ("tokens_per_second", "engine_tokens_per_second", "gauge", "Recent generation throughput."),
)


class _EngineCollector(Collector):
    """The engine snapshot handed to :meth:`Metrics.render`, as metric families."""

    def __init__(self) -> None:
        self.snapshot: object | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return
        for attribute, name, kind, help_text in _ENGINE_FIELDS:
            value = getattr(snapshot, attribute, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(f"{_PREFIX}_{name}", help_text, value=value)

    def describe(self) -> Iterator[Metric]:
        # Nothing to describe ahead of a scrape: the families depend on the snapshot.
        return iter(())


class Metrics:
    """Request counters, token counters and latency histograms of one server."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        """This server's registry: scrape it, or add an application's own metrics to it."""
        registry = self.registry
        self._requests = Counter(
            f"{_PREFIX}_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self._in_flight = Gauge(
            f"{_PREFIX}_http_requests_in_flight",
            "Requests being answered (not counting /health and /metrics).",
            registry=registry,
        )
        self._receiving = Gauge(
            f"{_PREFIX}_http_requests_receiving",
            "Chat completions whose body is still arriving.",
            registry=registry,
        )
        self._pixels = Gauge(
            f"{_PREFIX}_image_pixels_held",
            "Decoded image pixels held (or reserved) by requests in flight.",
            registry=registry,
        )
        self._latency = Histogram(
            f"{_PREFIX}_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["route"],
            buckets=tuple(buckets),
            registry=registry,
        )
        self._first_token = Histogram(
            f"{_PREFIX}_time_to_first_token_seconds",
            "Streamed chat completions: time from arrival to the first text piece.",
            buckets=tuple(buckets),
            registry=registry,
        )
        self._stages = Histogram(
            f"{_PREFIX}_engine_request_stage_seconds",
            "Answered chat completions: seconds in each stage (prepare: images and prompt; "
            "queue: waiting for a row; prefill; decode), from Result.timing.",
            ["stage"],
            buckets=tuple(buckets),
            registry=registry,
        )
        self._prompt_tokens = Counter(
            f"{_PREFIX}_prompt_tokens", "Prompt tokens of answered requests.", registry=registry
        )
        self._completion_tokens = Counter(
            f"{_PREFIX}_completion_tokens",
            "Completion tokens of answered requests.",
            registry=registry,
        )
        self._finish = Counter(
            f"{_PREFIX}_completions",
            "Answered requests by finish reason.",
            ["finish_reason"],
            registry=registry,
        )
        self._in_flight_count = 0
        self._engine = _EngineCollector()
        registry.register(self._engine)

    @property
    def in_flight(self) -> int:
        """Requests being answered (set by the server before each scrape)."""
        return self._in_flight_count

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight_count = value
        self._in_flight.set(value)

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and observe its latency.

        ``method`` outside :data:`METHODS` and a status outside 100-599 are
        counted as ``other``; ``route`` must come from the server's own route
        templates.
        """
        method = method if method in METHODS else "other"
        code = str(status) if 100 <= status <= 599 else "other"
        self._requests.labels(method=method, route=route, status=code).inc()
        self._latency.labels(route=route).observe(seconds)

    def completion_done(self, prompt_tokens: int, completion_tokens: int, finish: str) -> None:
        """Count the tokens and finish reason of one answered chat completion."""
        self._prompt_tokens.inc(prompt_tokens)
        self._completion_tokens.inc(completion_tokens)
        self._finish.labels(finish_reason=finish).inc()

    def stages(self, timing: Timing) -> None:
        """Observe where one answered request's time went in the engine."""
        for stage, seconds in zip(
            STAGES,
            (timing.prepare_s, timing.queue_s, timing.prefill_s, timing.decode_s),
            strict=True,
        ):
            self._stages.labels(stage=stage).observe(seconds)

    def first_token(self, seconds: float) -> None:
        """Observe a stream's time to its first piece."""
        self._first_token.observe(seconds)

    def gauges(self, *, receiving: int, pixels: int) -> None:
        """Set the gauges of request bodies arriving and image pixels held."""
        self._receiving.set(receiving)
        self._pixels.set(pixels)

    def render(self, engine: Any | None = None) -> str:
        """The exposition text; ``engine`` is a ``Generator.stats()`` value (or None)."""
        self._engine.snapshot = engine
        try:
            return generate_latest(self.registry).decode("utf-8")
        finally:
            self._engine.snapshot = None
