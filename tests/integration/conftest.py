"""Integration tier: one embedded local Ray per test session (address="local", num_cpus=4, dashboard on,
because Tune driving Train needs it). Tests that must own a Ray of their own run it in a subprocess."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from mengzi_ray.ray_runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4, include_dashboard=True)
    yield ray
    ray.shutdown()
