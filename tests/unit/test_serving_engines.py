"""Serving without Ray: settings validation, the n-gram candidate index, the caption and retrieval engines on tiny
random-init model dirs, gallery loading, request models and the error/limit/auth helpers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.serving.captioning import CaptionEngine, CaptionJob, RegionSet
from mengzi_ray.serving.errors import ApiError, BodyLimitMiddleware
from mengzi_ray.serving.gallery import load_gallery, read_caption_rows
from mengzi_ray.inference import MatchScorer
from mengzi_ray.index.ngram import NgramIndex, char_ngrams
from mengzi_ray.serving.retrieval import RetrievalEngine, SearchQuery
from mengzi_ray.serving.schemas import CaptionRequest, RegionsIn, component_schemas, request_body
from mengzi_ray.serving.settings import BatchedReplicaSection, GallerySection, ServeAppConfig
from tests.tiny_models import write_tiny_models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_unit")
    ds = write_synthetic_dataset(root / "data", num_train=6, num_val=6, seed=1)
    caption_dir, retrieval_dir = write_tiny_models(ds.text_path, ["圆形", "正方形", "三角形"], root / "models")
    gallery = load_gallery(GallerySection(features=str(ds.features_path), texts=str(ds.text_path), split="val"))
    return ds, caption_dir, retrieval_dir, gallery


def test_serve_config_yaml_validates_and_batches_can_fill():
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text(encoding="utf-8"))
    (app,) = config["applications"]
    assert app["import_path"] == "mengzi_ray.serving.app:build_app"
    settings = ServeAppConfig.model_validate(app["args"])
    for section in (settings.captioner, settings.retriever, settings.detector):
        assert section.max_ongoing_requests >= section.max_batch_size
        options = section.deployment_options()
        assert options["autoscaling_config"]["max_replicas"] == section.max_replicas
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        BatchedReplicaSection(max_batch_size=16, max_ongoing_requests=8)
    with pytest.raises(ValidationError, match="max_replicas"):
        BatchedReplicaSection(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ServeAppConfig.model_validate({**app["args"], "captioner": {**app["args"]["captioner"], "beams": 3}})
    with pytest.raises(ValidationError, match="default_num_beams"):
        ServeAppConfig.model_validate({**app["args"], "default_num_beams": 9})


def test_char_ngrams_normalise_and_split_on_punctuation():
    assert char_ngrams("紅色，圆") == ["红", "色", "红色", "圆"]  # OpenCC t2s: 紅 → 红
    assert char_ngrams("") == []


def test_ngram_index_ranks_overlap_first_and_ignores_unknown_grams():
    index = NgramIndex(["圆形 正方形", "三角形", "圆形", "正方形 三角形"])
    assert list(index.query("一个圆形", 2)) == [2, 0]
    assert list(index.query("三角形", 4))[:2] == [1, 3]
    assert len(index.query("完全无关", 3)) == 3  # all-zero scores still give k indices (document order)


def test_caption_engine_batches_mixed_beam_requests(tiny):
    _, caption_dir, _, gallery = tiny
    engine = CaptionEngine.from_model_dir(str(caption_dir), max_gen_length=12)
    jobs = [CaptionJob(gallery.regions[0], 3, 2), CaptionJob(gallery.regions[1], 1, 1), CaptionJob(gallery.regions[0], 3, 1)]
    results = engine.caption(jobs)
    assert [len(r.captions) for r in results] == [2, 1, 1]
    assert all(r.batch_size == 3 for r in results)
    assert results[0].captions[0] == results[2].captions[0]  # same image, same beams → same best caption
    assert results[0].captions[0][1] >= results[0].captions[1][1]
    alone = engine.caption([CaptionJob(gallery.regions[1], 1, 1)])[0]
    assert alone.captions == results[1].captions  # batching does not change the answer
    many = RegionSet(np.zeros((engine.max_regions + 3, engine.feature_dim), np.float32), ["圆形"] * (engine.max_regions + 3))
    assert engine.caption([CaptionJob(many, 1, 1)])[0].regions_used == engine.max_regions
    with pytest.raises(ValueError, match="top_n"):
        engine.caption([CaptionJob(gallery.regions[0], 1, 2)])


def test_two_stage_search_matches_brute_force_when_shortlist_covers_gallery(tiny):
    _, _, retrieval_dir, gallery = tiny
    encoder = MatchScorer.from_model_dir(str(retrieval_dir), batch_size=4)
    brute = RetrievalEngine(encoder, gallery, candidates=None)
    full = RetrievalEngine(encoder, gallery, candidates=len(gallery.captions))  # covers both galleries
    narrow = RetrievalEngine(encoder, gallery, candidates=2)
    queries = [SearchQuery(k=3, text="红色的圆形"), SearchQuery(k=4, regions=gallery.regions[2])]
    b, f, n = brute.search(queries), full.search(queries), narrow.search(queries)
    assert [[h.index for h in hits] for hits in b] == [[h.index for h in hits] for hits in f]
    assert [len(hits) for hits in n] == [3, 4]  # the shortlist grows to k
    pairs = [("红色的圆形", " ".join(gallery.regions[h.index].tags), gallery.regions[h.index].features) for h in b[0]]
    np.testing.assert_allclose(encoder.score(pairs), [h.score for h in b[0]], rtol=1e-5)
    assert [h.score for h in b[0]] == sorted((h.score for h in b[0]), reverse=True)


def test_gallery_loading_and_caption_rows(tiny, tmp_path):
    ds, _, _, gallery = tiny
    assert len(gallery) == 6 and len(gallery.captions) == 18  # the val images and their captions
    assert set(gallery.caption_image_ids) <= set(gallery.image_ids)
    assert gallery.image_bytes(gallery.image_ids[0], str(ds.images_dir)).startswith(b"\x89PNG")
    assert gallery.image_bytes(gallery.image_ids[0], None) is None  # no images_root: the route serves nothing
    assert gallery.image_bytes("../../etc/passwd", "/") is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image_id": "a", "text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        read_caption_rows(str(bad), None)
    limited = load_gallery(GallerySection(features=str(ds.features_path), max_images=3))
    assert len(limited) == 3 and limited.captions == []


def test_request_models_and_openapi_components():
    with pytest.raises(ValidationError, match="exactly one"):
        CaptionRequest.model_validate({})
    with pytest.raises(ValidationError, match="exactly one"):
        CaptionRequest.model_validate({"image_base64": "", "regions": {"features": [], "tags": []}})
    with pytest.raises(ValidationError):
        RegionsIn.model_validate({"features": [[float("nan")]], "tags": ["x"]})
    with pytest.raises(ValidationError, match="boxes"):
        RegionsIn.model_validate({"features": [[1.0]], "tags": ["x"], "boxes": []})
    schemas = component_schemas()
    assert {"CaptionRequest", "RegionsIn", "SearchImagesRequest", "SearchCaptionsRequest"} <= set(schemas)
    body = request_body(CaptionRequest)["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/CaptionRequest"
    assert body["multipart/form-data"]["schema"]["required"] == ["image"]


def test_api_error_survives_pickling_and_renders_json():
    import pickle

    error = pickle.loads(pickle.dumps(ApiError(422, "bad_regions", "regions.features must be (N, 2054)", "regions.features")))
    response = error.response()
    assert response.status_code == 422
    assert json.loads(response.body) == {
        "error": {"code": "bad_regions", "message": "regions.features must be (N, 2054)", "field": "regions.features"}
    }


def _asgi_call(middleware, body_chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, bytes]:
    """Drive an ASGI app with a POST; returns (status, response body, body the inner app received)."""
    seen = {"body": b""}

    async def inner(scope, receive, send):
        while True:
            message = await receive()
            seen["body"] += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1} for i, c in enumerate(body_chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
    asyncio.run(middleware(inner)(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), seen["body"]


def test_body_limit_refuses_declared_and_streamed_oversize_bodies():
    def limited(app):
        return BodyLimitMiddleware(app, max_bytes=lambda: 10)

    status, _, received = _asgi_call(limited, [b"12345", b"6789"], [])
    assert (status, received) == (200, b"123456789")
    status, body, received = _asgi_call(limited, [b"123456", b"78901"], [])  # chunked, no length header
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large" and received == b""
    status, _, received = _asgi_call(limited, [b"1"], [(b"content-length", b"11")])
    assert status == 413 and received == b""


def test_build_app_takes_the_yaml_args_as_serve_passes_them():
    """Serve hands the builder the YAML's `args` as a plain dict; the builder validates it (a bad field is a
    ValidationError naming it) and composes the four deployments."""
    from mengzi_ray.serving.app import build_app

    args = yaml.safe_load((REPO / "serve" / "config.yaml").read_text(encoding="utf-8"))["applications"][0]["args"]
    app = build_app(args)
    assert app._bound_deployment.name == "Api"
    with pytest.raises(ValidationError, match="limits.max_k"):
        build_app({**args, "limits": {**args["limits"], "max_k": 0}})
