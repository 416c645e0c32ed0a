"""End-to-end tier fixtures: a Ray head per test module (see cluster_harness.py)."""

from __future__ import annotations

import pytest
from cluster_harness import RayHead, start_head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> RayHead:
    yield from start_head(tmp_path_factory)
