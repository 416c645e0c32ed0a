"""The serving app fails closed: no token, no start; the gallery route stays under its images root; model calls
have a server-side limit; server faults are 503 JSON; a wedged model fails the health check; anonymous callers
do not see storage URIs. The Api deployment's class is exercised directly, with stand-in handles."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from starlette.requests import Request

from mengzi_ray.serving.api import Api
from mengzi_ray.serving.deployments import Detector, ModelWatch
from mengzi_ray.serving.errors import ApiError
from mengzi_ray.serving.gallery import Gallery
from mengzi_ray.serving.settings import LimitsSection

ROOT = Path(__file__).resolve().parents[2]
TOKEN_ENV = "MENGZI_TEST_SECURITY_TOKEN"
# The class as written: Serve's ingress wrapper (Api.func_or_class) adds an async constructor that needs a replica.
ApiClass = Api.func_or_class.__mro__[1]


class Method:
    """Stands in for `handle.<method>`: `.remote(...)` is awaitable like a DeploymentResponse."""

    def __init__(
        self, answer: Any = None, delay_s: float = 0.0, error: BaseException | None = None, failing_calls: int | None = None
    ) -> None:
        """`error` is raised by every call, or by the first `failing_calls` calls when that is given."""
        self.answer, self.delay_s, self.error, self.failing_calls, self.calls = answer, delay_s, error, failing_calls, 0

    async def _run(self) -> Any:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.error is not None and (self.failing_calls is None or self.calls <= self.failing_calls):
            raise self.error
        return self.answer

    def remote(self, *_: Any) -> Any:
        return self._run()


class Handle:
    def __init__(self, **methods: Method) -> None:
        self.__dict__.update(methods)


def make_api(monkeypatch: pytest.MonkeyPatch, token: str | None, allow_anonymous: bool = False, **handles: Handle) -> Any:
    if token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, token)
    info = Handle(info=Method({"model_dir": "s3://models/secret-run/model", "gallery": "s3://data/features", "n": 1}))
    parts = {"detector": info, "captioner": info, "retriever": info, **handles}
    return ApiClass(parts["detector"], parts["captioner"], parts["retriever"],
                             LimitsSection(call_timeout_s=0.5), 3, TOKEN_ENV, "abc123", allow_anonymous)


def request(headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": raw, "query_string": b""})


def test_no_token_refuses_to_start_unless_anonymous_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=f"env var {TOKEN_ENV} is empty: set it to the bearer token"):
        make_api(monkeypatch, None)
    with pytest.raises(RuntimeError, match="is empty"):
        make_api(monkeypatch, "")
    api = make_api(monkeypatch, None, allow_anonymous=True)
    models = asyncio.run(api.models(request()))
    assert "model_dir" not in models["captioner"] and "gallery" not in models["retriever"] and models["commit"] is None
    assert "s3://" not in repr(models)


def test_with_a_token_every_v1_route_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    api = make_api(monkeypatch, "t0ken", allow_anonymous=True)  # a token set wins over allow_anonymous
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic t0ken"}):
        with pytest.raises(ApiError) as refused:
            asyncio.run(api.models(request(headers)))
        assert refused.value.status == 401
    for route in (api.caption, api.search_images, api.search_captions):
        with pytest.raises(ApiError, match="bearer token"):
            asyncio.run(route(request()))
    with pytest.raises(ApiError, match="bearer token"):
        asyncio.run(api.gallery_image("x", request()))
    models = asyncio.run(api.models(request({"Authorization": "Bearer t0ken"})))
    assert models["captioner"]["model_dir"] == "s3://models/secret-run/model" and models["commit"] == "abc123"


def test_a_model_call_times_out_at_the_server_limit_whatever_the_client_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = Method(answer=[], delay_s=30)
    api = make_api(monkeypatch, "t", retriever=Handle(search=slow, info=Method({})))
    # `x-request-timeout-seconds: 0` makes Ray's proxy wait forever; the ingress's own limit still holds
    start = time.monotonic()
    with pytest.raises(ApiError) as timed_out:
        asyncio.run(api._call(api.retriever.search, "query"))
    assert time.monotonic() - start < 5
    assert (timed_out.value.status, timed_out.value.code) == (503, "model_timeout")
    assert "call_timeout_s=0.5" in timed_out.value.message


def test_server_faults_are_503_and_a_client_fault_stays_4xx(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Method(error=RuntimeError("CUDA out of memory"))
    api = make_api(monkeypatch, "t", captioner=Handle(caption=broken, info=Method({})))
    with pytest.raises(ApiError) as fault:
        asyncio.run(api._call(api.captioner.caption, "job"))
    assert (fault.value.status, fault.value.code) == (503, "model_unavailable")
    refused = ApiError(422, "bad_regions", "x")
    api = make_api(monkeypatch, "t", captioner=Handle(caption=Method(answer=refused), info=Method({})))
    with pytest.raises(ApiError) as client_fault:
        asyncio.run(api._call(api.captioner.caption, "job"))
    assert client_fault.value.status == 422


def test_a_replica_that_died_holding_only_this_request_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """L7: a poison request (it OOM-kills its replica) must not take down a second replica by its retry."""
    from ray.exceptions import ActorDiedError

    poison = Method(answer=["caption"], error=ActorDiedError(), failing_calls=1)
    api = make_api(monkeypatch, "t", captioner=Handle(caption=poison, info=Method({})))
    with pytest.raises(ApiError) as refused:
        asyncio.run(api._call(api.captioner.caption, "job"))
    assert (refused.value.status, refused.value.code) == (503, "model_unavailable")
    assert "not retried" in refused.value.message and poison.calls == 1  # the second replica never saw it


def test_a_replica_that_died_with_other_calls_or_was_unreachable_is_retried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    died = ActorDiedError()
    died.actor_id = "replica-a"
    batch = Method(answer=["caption"], error=died, failing_calls=2)  # one replica held both calls when it died
    api = make_api(monkeypatch, "t", captioner=Handle(caption=batch, info=Method({})))

    async def two_calls() -> list[Any]:
        return await asyncio.gather(api._call(api.captioner.caption, "a"), api._call(api.captioner.caption, "b"))

    assert asyncio.run(two_calls()) == [["caption"], ["caption"]] and batch.calls == 4  # each retried once
    unreachable = Method(answer=["caption"], error=ActorUnavailableError("connection lost", None), failing_calls=1)
    api = make_api(monkeypatch, "t", captioner=Handle(caption=unreachable, info=Method({})))
    assert asyncio.run(api._call(api.captioner.caption, "job")) == ["caption"] and unreachable.calls == 2
    twice = Method(error=ActorUnavailableError("connection lost", None))
    api = make_api(monkeypatch, "t", captioner=Handle(caption=twice, info=Method({})))
    with pytest.raises(ApiError, match="ActorUnavailableError"):
        asyncio.run(api._call(api.captioner.caption, "job"))
    assert twice.calls == 2  # once, not forever


def test_detector_input_errors_are_422_and_model_faults_503() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    bad_input = Detector.func_or_class._refusal((image, None), ValueError("boxes must be finite"))
    oom = Detector.func_or_class._refusal((image, None), RuntimeError("CUDA out of memory"))
    assert (bad_input.status, bad_input.code) == (422, "detect_failed")
    assert (oom.status, oom.code) == (503, "detector_unavailable")


def test_health_fails_while_a_model_call_is_wedged() -> None:
    watch = ModelWatch(stall_timeout_s=0.2)
    watch.check("captioner")  # idle: healthy

    async def wedged() -> None:
        task = asyncio.create_task(watch.run(time.sleep, 0.6))
        await asyncio.sleep(0.4)
        with pytest.raises(RuntimeError, match="captioner: a model call has not answered for 0 s|for [0-9]+ s"):
            watch.check("captioner")
        await task

    asyncio.run(wedged())
    watch.check("captioner")  # answered: healthy again


def _gallery(sources: list[str]) -> Gallery:
    return Gallery([f"i{n}" for n in range(len(sources))], [None] * len(sources), sources, [], [])  # type: ignore[list-item]


def test_gallery_serves_only_images_under_its_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "子目录").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "子目录" / "猫 1.png")
    Image.new("RGB", (4, 4)).save(root / "ok.jpg")
    (root / "notes.png").write_text("not an image, named like one")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    (root / "escape.png").symlink_to(outside)
    sources = [
        (root / "子目录" / "猫 1.png").as_uri(),  # percent-encoded file:// URI
        str(root / "ok.jpg"),  # absolute path under the root
        f"{root}/../secret.png",  # traversal
        str(outside),  # absolute, outside
        "/etc/passwd",
        "file:///etc/passwd",
        str(root / "escape.png"),  # a symlink out of the root
        str(root / "notes.png"),  # under the root, but no image signature
        "s3://bucket/key.png",
        "relative/ok.jpg",
    ]
    gallery = _gallery(sources)
    served = [gallery.image_bytes(f"i{n}", str(root)) is not None for n in range(len(sources))]
    assert served == [True, True] + [False] * 8
    assert gallery.image_bytes("i0", None) is None and gallery.image_bytes("unknown", str(root)) is None


def test_shipped_configs_fail_closed() -> None:
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert local["applications"][0]["args"]["allow_anonymous"] is True
    assert local["http_options"]["host"] == "127.0.0.1"  # the anonymous demo is never reachable from outside
    cluster = yaml.safe_load((ROOT / "serve" / "cluster.yaml").read_text())
    assert "allow_anonymous" not in cluster["applications"][0]["args"]
    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert "allow_anonymous" not in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    for name in ("raycluster.yaml", "rayservice.yaml"):
        text = (ROOT / "cluster" / "kuberay" / name).read_text()
        doc = yaml.safe_load(text)
        spec = doc["spec"].get("rayClusterConfig", doc["spec"])
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                ref = env["MENGZI_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "mengzi-serve-token", "key": "token"}, (name, container["name"])
    aws = (ROOT / "cluster" / "aws.yaml").read_text()
    assert aws.count("get_secret_value(SecretId=\"mengzi-serve-token\")") == 2  # head and workers
