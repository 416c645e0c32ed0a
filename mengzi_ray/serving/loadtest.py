"""A bounded HTTP load generator for the serving tests and bench/bench_serve.py: a fixed number of POSTs at a
fixed concurrency (one thread per connection), that stops by itself and counts every outcome exactly.

Loopback only by intent: it is a test tool, not a general load tester.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadReport:
    total: int
    ok: int
    errors: Counter[str]  # "HTTP 503", "ReadTimeout", ... → count
    latencies_s: list[float] = field(repr=False)
    wall_s: float
    batch_sizes: Counter[int]  # the `batch_size` field of successful responses, where present

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies_s)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.total,
            "ok": self.ok,
            "errors": dict(self.errors),
            "req_per_s": self.total / self.wall_s if self.wall_s else 0.0,
            "p50_ms": self.percentile(0.50) * 1000,
            "p99_ms": self.percentile(0.99) * 1000,
            "mean_batch_size": statistics.fmean(self.batch_sizes.elements()) if self.batch_sizes else None,
        }


class LoadRun:
    """POST `body` (JSON) to `url` `total` times from `concurrency` threads. `start()`, watch `done`, `wait()`."""

    def __init__(self, url: str, body: dict[str, Any], *, total: int, concurrency: int, headers: dict[str, str] | None = None, timeout_s: float = 120.0):
        if total < 1 or concurrency < 1:
            raise ValueError(f"total ({total}) and concurrency ({concurrency}) must be positive")
        self.url, self.total, self.concurrency = url, total, concurrency
        # Encoded once: serialising a large body per request in the client's threads would load the machine
        # under test with the load generator's own work.
        self.payload = json.dumps(body).encode("utf-8")
        self.headers, self.timeout_s = {**(headers or {}), "content-type": "application/json"}, timeout_s
        self._lock = threading.Lock()
        self._issued = 0
        self.done = 0
        self._latencies: list[float] = []
        self._errors: Counter[str] = Counter()
        self._batches: Counter[int] = Counter()
        self._threads: list[threading.Thread] = []
        self._start = 0.0

    def _take(self) -> bool:
        with self._lock:
            if self._issued >= self.total:
                return False
            self._issued += 1
            return True

    def _worker(self) -> None:
        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client:
            while self._take():
                start = time.perf_counter()
                outcome, batch = None, None
                try:
                    response = client.post(self.url, content=self.payload)
                    if response.status_code == 200:
                        batch = response.json().get("batch_size")
                    else:
                        outcome = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                except ValueError:  # a 200 whose body is not JSON: counted, never a dead worker thread
                    outcome = "bad JSON"
                elapsed = time.perf_counter() - start
                with self._lock:
                    self.done += 1
                    if outcome is None:
                        self._latencies.append(elapsed)
                        if isinstance(batch, int):
                            self._batches[batch] += 1
                    else:
                        self._errors[outcome] += 1

    def start(self) -> "LoadRun":
        self._start = time.perf_counter()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def wait(self) -> LoadReport:
        for thread in self._threads:
            thread.join()
        wall = time.perf_counter() - self._start
        return LoadReport(self.total, len(self._latencies), self._errors, self._latencies, wall, self._batches)


def run_load(url: str, body: dict[str, Any], *, total: int, concurrency: int, headers: dict[str, str] | None = None) -> LoadReport:
    """Run a load to completion and report it."""
    return LoadRun(url, body, total=total, concurrency=concurrency, headers=headers).start().wait()
