"""Benchmark 6: ``idefics-kit serve`` under concurrent clients, batched vs one at a time.

Two servers of the built-in toy model run side by side as real
``idefics-kit serve`` processes on loopback: the default engine (concurrent
requests share decoding batches) and the same server with
``--max-batch-size 1`` (one request at a time, which is what
``transformers serve`` does for vision-language models). For 1, 8 and 32
concurrent clients each side answers the same requests, every one about a
freshly drawn picture (so the vision cache never helps), sent as a ``data:``
URI; sides alternate within each round. Reported: requests per second,
generated tokens per second, p50/p95 latency per request, answers right, and
the ratios batched / one-at-a-time.

    .venv/bin/python benchmarks/bench_server.py [--quick] [--rounds N]

Writes ``benchmarks/results/server.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from _common import table, write_results  # first: sets HF_HUB_OFFLINE

from idefics_kit.toy.scenes import QUESTIONS, QuestionKind, Scene, draw_scene

LEVELS = (1, 8, 32)
KINDS: tuple[QuestionKind, ...] = ("color", "shape", "describe")
MAX_TOKENS = 16
SIDES = {"batched": [], "one-at-a-time": ["--max-batch-size", "1"]}


@dataclass(frozen=True, slots=True)
class Ask:
    body: dict[str, Any]
    answer: str


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    latencies: list[float]
    tokens: int
    right: int

    @property
    def requests(self) -> int:
        return len(self.latencies)


def asks(seed: int, count: int) -> list[Ask]:
    """``count`` questions, each about a new picture, as chat-completion bodies."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        scene: Scene = draw_scene(rng)
        kind = KINDS[index % len(KINDS)]
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {
            "model": "toy",
            "max_tokens": MAX_TOKENS,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": QUESTIONS[kind]},
                    ],
                }
            ],
        }
        out.append(Ask(body, scene.answer(kind)))
    return out


class Foreign:
    """Share of the CPUs used by processes other than this one and the two servers."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.share = 0.0

    def _sample(self) -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as file:
            fields = [int(v) for v in file.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks
        ours = sum(os.times()[:2])
        for pid in self.pids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as file:
                stat = file.read().rsplit(")", 1)[1].split()
                ours += (int(stat[11]) + int(stat[12])) / ticks  # utime, stime
        return busy, ours, time.perf_counter()

    def __enter__(self) -> Foreign:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, ours, now = self._sample()
        elapsed = (now - self._start[2]) * (os.cpu_count() or 1)
        foreign = (busy - self._start[0]) - (ours - self._start[1])
        self.share = round(max(0.0, foreign / elapsed), 3) if elapsed > 0 else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(extra: Sequence[str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    command = [sys.executable, "-m", "idefics_kit", "serve", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [*command, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def load(url: str, work: list[Ask], clients: int) -> Run:
    """``clients`` concurrent clients share ``work``, one request at a time each."""
    pending = list(reversed(work))
    latencies: list[float] = []
    tokens = right = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, right
        while pending:
            ask = pending.pop()
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json=ask.body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            data = response.json()
            tokens += data["usage"]["completion_tokens"]
            right += data["choices"][0]["message"]["content"] == ask.answer

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return Run(seconds, latencies, tokens, right)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def uptime() -> str:
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per level (default: 2)")
    args = parser.parse_args()
    per_level = {c: (8 if args.quick else max(32, 4 * c)) for c in LEVELS}
    load_before = uptime()
    print(f"load average before: {load_before}")
    runs: dict[str, dict[int, list[Run]]] = {side: {c: [] for c in LEVELS} for side in SIDES}
    foreign: list[float] = []
    with contextlib.ExitStack() as stack:
        started = {side: stack.enter_context(server(extra)) for side, extra in SIDES.items()}
        urls = {side: url for side, (url, _) in started.items()}
        pids = [pid for _, pid in started.values()]
        for url in urls.values():  # warm-up: first calls load lazy parts
            asyncio.run(load(url, asks(seed=999, count=4), 2))
        for round_index in range(args.rounds):
            for level in LEVELS:
                work = asks(seed=1000 * round_index + level, count=per_level[level])
                order = list(SIDES) if round_index % 2 == 0 else list(reversed(SIDES))
                for side in order:
                    with Foreign(pids) as measured:
                        run = asyncio.run(load(urls[side], work, level))
                    foreign.append(measured.share)
                    runs[side][level].append(run)
                    print(
                        f"round {round_index + 1} {side:>13} clients={level:>2}: "
                        f"{run.requests / run.seconds:6.2f} req/s, p50 "
                        f"{percentile(run.latencies, 0.5) * 1000:7.0f} ms, right {run.right}/{run.requests}"
                    )
        metrics = httpx.get(f"{urls['batched']}/metrics").text
    mean_batch = next(
        (
            line.split()[1]
            for line in metrics.splitlines()
            if line.startswith("idefics_kit_engine_mean_batch_size ")
        ),
        "?",
    )
    load_after = uptime()

    rows = []
    results: dict[str, Any] = {}
    for level in LEVELS:
        entry: dict[str, Any] = {}
        for side in SIDES:
            level_runs = runs[side][level]
            latencies = [value for run in level_runs for value in run.latencies]
            requests = sum(run.requests for run in level_runs)
            seconds = sum(run.seconds for run in level_runs)
            entry[side] = {
                "requests": requests,
                "requests_per_s": round(requests / seconds, 3),
                "tokens_per_s": round(sum(run.tokens for run in level_runs) / seconds, 2),
                "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
                "p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
                "right": sum(run.right for run in level_runs),
            }
        batched, serial = entry["batched"], entry["one-at-a-time"]
        entry["throughput_ratio"] = round(batched["requests_per_s"] / serial["requests_per_s"], 2)
        entry["p50_ratio"] = round(serial["p50_ms"] / batched["p50_ms"], 2)
        entry["p95_ratio"] = round(serial["p95_ms"] / batched["p95_ms"], 2)
        results[str(level)] = entry
        for side in SIDES:
            s = entry[side]
            rows.append(
                [
                    f"{level} clients, {side}",
                    f"{s['requests_per_s']:.2f}",
                    f"{s['tokens_per_s']:.1f}",
                    f"{s['p50_ms']:.0f}",
                    f"{s['p95_ms']:.0f}",
                    f"{s['right']}/{s['requests']}",
                ]
            )
        rows.append(
            [
                f"{level} clients, ratio",
                f"{entry['throughput_ratio']:.2f}x",
                "",
                f"{entry['p50_ratio']:.2f}x",
                f"{entry['p95_ratio']:.2f}x",
                "",
            ]
        )
    print()
    print(table(["", "req/s", "tokens/s", "p50 ms", "p95 ms", "right"], rows))
    print(f"\nbatched server: mean batch size {mean_batch}")
    print(
        f"load average before {load_before}, after {load_after}; foreign CPU share "
        f"median {statistics.median(foreign):.0%}"
    )
    path = write_results(
        "server",
        {
            "levels": results,
            "max_tokens": MAX_TOKENS,
            "rounds": args.rounds,
            "requests_per_level": per_level,
            "batched_mean_batch_size": mean_batch,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "foreign_cpu_share_median": round(statistics.median(foreign), 3),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
