"""start_local_ray retries a start that fails and re-raises when every attempt failed (ray.init patched: no Ray)."""

from __future__ import annotations

import pytest
import ray

from mengzi_ray.ray_runtime import start_local_ray


def patched_init(monkeypatch, failures: int) -> tuple[list[dict], list[int]]:
    """ray.init that fails `failures` times; returns (init kwargs per call, calls made before each shutdown)."""
    calls: list[dict] = []
    shutdowns: list[int] = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) <= failures:
            raise RuntimeError("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(len(calls)))
    return calls, shutdowns


def test_a_failed_start_is_cleaned_up_and_tried_again(monkeypatch):
    calls, shutdowns = patched_init(monkeypatch, failures=2)
    start_local_ray(num_cpus=4, include_dashboard=False)
    assert calls == [{"address": "local", "num_cpus": 4, "include_dashboard": False}] * 3
    assert shutdowns == [1, 2]


def test_the_last_error_is_raised_when_every_attempt_fails(monkeypatch):
    calls, shutdowns = patched_init(monkeypatch, failures=5)
    with pytest.raises(RuntimeError, match="timed out during startup"):
        start_local_ray(num_cpus=2, attempts=2)
    assert len(calls) == 2 and shutdowns == [1, 2]
