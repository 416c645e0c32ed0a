"""Integration tier: one embedded local Ray per test session (address="local", num_cpus=4, dashboard on,
because Tune driving Train needs it). Tests that must own a Ray of their own run it in a subprocess."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    for attempt in range(3):  # a loaded machine can miss the raylet's fixed startup waits; a fresh try passes
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=True)
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
