"""The server-side call limit over HTTP: a deployed app whose model never answers in time, a client that sends
`x-request-timeout-seconds: 0` (Ray's proxy then waits forever) → the ingress still answers 503 JSON at
limits.call_timeout_s. The Api ingress as shipped, composed with a test-only slow deployment in place of the
models (loading real ones would only add start-up time)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx
import pytest
from ray import serve

from mengzi_ray.serving.api import Api
from mengzi_ray.serving.settings import LimitsSection

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 3.0
MODEL_SLEEP_S = 120.0


@serve.deployment(name="SlowModel", ray_actor_options={"num_cpus": 0.25})
class SlowModel:
    """Answers every model method after MODEL_SLEEP_S (a wedged or overloaded model)."""

    async def search(self, queries: Any) -> list[dict[str, Any]]:
        await asyncio.sleep(MODEL_SLEEP_S)
        return []

    def info(self) -> dict[str, Any]:
        return {"name": "slow"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slow_app(ray_local):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    slow = SlowModel.bind()
    limits = LimitsSection(call_timeout_s=CALL_TIMEOUT_S)
    ingress = Api.options(ray_actor_options={"num_cpus": 0.25}).bind(slow, slow, slow, limits, 1, "MENGZI_UNSET_TOKEN", None, True)
    serve.run(ingress, name="slow", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_a_client_cannot_lift_the_server_call_limit(slow_app: str) -> None:
    start = time.monotonic()
    answer = httpx.post(
        slow_app + "/v1/search/images", json={"text": "圆形", "k": 3}, headers={"x-request-timeout-seconds": "0"},
        timeout=MODEL_SLEEP_S / 2,
    )
    elapsed = time.monotonic() - start
    assert answer.status_code == 503 and answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["code"] == "model_timeout"
    assert f"call_timeout_s={CALL_TIMEOUT_S}" in answer.json()["error"]["message"]
    assert CALL_TIMEOUT_S <= elapsed < CALL_TIMEOUT_S + 20  # the server's limit, far from the model's 120 s
