"""The ingress's request reading without Ray: the compact base64 region form, large-image decoding (integer
16→8-bit, reduced JPEG decode with boxes mapped back), and the start-up check that names a deployment that cannot
be placed."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mengzi_ray.features.decode import decode_image, decode_image_for
from mengzi_ray.serving.api import _region_array
from mengzi_ray.serving.app import unfit_deployment
from mengzi_ray.serving.errors import ApiError
from mengzi_ray.serving.schemas import CaptionRequest, RegionsIn, component_schemas
from mengzi_ray.serving.settings import ServeAppConfig


def regions_b64(array: np.ndarray, dtype: str = "float32", **extra) -> dict:
    raw = array.astype("<f4" if dtype == "float32" else "<f2").tobytes()
    return {"features_b64": base64.b64encode(raw).decode(), "shape": list(array.shape), "dtype": dtype,
            "tags": ["圆形"] * array.shape[0], **extra}


def test_base64_regions_equal_json_regions_and_float16_is_accepted():
    feats = np.random.default_rng(0).normal(size=(3, 2054)).astype(np.float32)
    compact = _region_array(RegionsIn.model_validate(regions_b64(feats)))
    listed = _region_array(RegionsIn.model_validate({"features": feats.tolist(), "tags": ["圆形"] * 3}))
    np.testing.assert_array_equal(compact, feats)
    np.testing.assert_array_equal(listed, feats)
    half = _region_array(RegionsIn.model_validate(regions_b64(feats, "float16")))
    assert half.dtype == np.float32 and half.shape == (3, 2054)
    np.testing.assert_allclose(half, feats, atol=2e-3, rtol=1e-3)
    empty = _region_array(RegionsIn.model_validate({"features_b64": "", "shape": [0, 2054], "tags": []}))
    assert empty.shape == (0, 2054)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"features_b64": "AAAA", "shape": [1, 2054], "tags": ["圆形"]}, "regions.features_b64", "needs 8216"),
        ({"features_b64": "A" * 40_000, "shape": [1, 2054], "tags": ["圆形"]}, "regions.features_b64", "longer than"),
        ({"features_b64": "!!!!", "shape": [1, 1], "tags": ["圆形"]}, "regions.features_b64", "not valid base64"),
        ({"features_b64": "", "shape": [1, 0], "tags": ["圆形"]}, "regions.shape", "between 1 and"),
    ],
)
def test_bad_base64_regions_are_422_naming_the_field(body: dict, field: str, message: str):
    with pytest.raises(ApiError) as info:
        _region_array(RegionsIn.model_validate(body))
    assert info.value.status == 422 and info.value.field == field and message in info.value.message


def test_region_forms_are_exclusive_and_documented():
    with pytest.raises(ValueError, match="exactly one of features"):
        RegionsIn.model_validate({"features": [[0.0]], "features_b64": "AAAA", "shape": [1, 1], "tags": ["a"]})
    with pytest.raises(ValueError, match="needs it"):
        RegionsIn.model_validate({"features_b64": "AAAA", "tags": ["a"]})
    CaptionRequest.model_validate({"regions": regions_b64(np.zeros((1, 4), np.float32)), "num_beams": 3})
    schema = component_schemas()["RegionsIn"]["properties"]
    assert {"features_b64", "shape", "dtype"} <= set(schema) and schema["dtype"]["enum"] == ["float32", "float16"]


def test_16_bit_grey_becomes_8_bit_as_v_over_257_rounded():
    values = np.arange(0, 65536, dtype=np.uint16).reshape(256, 256)
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    rgb = decode_image(out.getvalue())
    expected = np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)


def test_a_large_jpeg_decodes_reduced_with_the_scale_to_map_boxes_back():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, size=(2400, 3200, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    reduced = decode_image_for(out.getvalue(), 16_000_000, (320, 480))
    assert reduced.scale == 4.0 and reduced.pixels.shape == (600, 800, 3)  # ≥ 480 long / 320 short, power of 2
    full = decode_image_for(out.getvalue(), 16_000_000, None)
    assert full.scale == 1.0 and full.pixels.shape == (2400, 3200, 3)
    close = decode_image_for(out.getvalue(), 16_000_000, (1300, 2000))  # under 2x the target: not reduced
    assert close.scale == 1.0
    png = io.BytesIO()
    image.resize((800, 600)).save(png, format="PNG")
    assert decode_image_for(png.getvalue(), 16_000_000, (100, 150)).scale == 1.0  # only JPEG decodes reduced


def serve_config(**cpus: float) -> ServeAppConfig:
    model = {"max_batch_size": 1, "max_ongoing_requests": 4}
    return ServeAppConfig.model_validate({
        "captioner": {"model_dir": "c", "num_cpus": cpus.get("captioner", 0.5), **model},
        "retriever": {"model_dir": "r", "gallery": {"features": "f"}, "num_cpus": cpus.get("retriever", 0.5), **model},
        "detector": {"model": {"backend": "given_boxes", "given_boxes_featurizer": "pixel_crops"},
                     "num_cpus": cpus.get("detector", 0.5), **model},
        "ingress": {"num_cpus": cpus.get("ingress", 0.25)},
    })


def test_startup_check_names_the_deployment_that_cannot_be_placed():
    laptop = [{"CPU": 2.0}]
    assert unfit_deployment(serve_config(), laptop) is None  # the shipped local sizes: 1.75 of 2 CPUs
    problem = unfit_deployment(serve_config(ingress=0.5, detector=1, captioner=1, retriever=1), laptop)
    assert problem is not None and "\n" not in problem
    assert problem.startswith("deployment Captioner cannot fit: replica 1 of min_replicas=1 needs 1 CPU")
    assert "the cluster has 2 CPU" in problem and "already take 1.5" in problem
    gpu = serve_config()
    gpu.captioner.num_gpus = 1
    assert unfit_deployment(gpu, laptop).startswith("deployment Captioner cannot fit: replica 1 of min_replicas=1 needs 1 GPU")
    assert unfit_deployment(gpu, [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]) is None
