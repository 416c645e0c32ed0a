"""The extract job on local Ray over a bucket of good and bad images: every input ends in features/ or errors/."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from mengzi_ray import storage
from mengzi_ray.config import load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.features import extract
from mengzi_ray.features.card import ExtractCard
from mengzi_ray.features.schema import ERRORS_SCHEMA, FEATURES_SCHEMA, REGION_DIM
from tests.unit.test_storage_s3 import s3_endpoint  # noqa: F401  (the moto fixture)

REPO = Path(__file__).resolve().parents[2]
BOMB_SIDE = 5000  # 25 MP, above the test card's max_pixels
MAX_PIXELS = 16_000_000

# image_id → the stage it must fail in; every other input must end in features/.
EXPECTED_ERRORS = {
    "bad/corrupt_jpeg": "decode",
    "bad/truncated_png": "decode",
    "bad/text_named_jpg": "decode",
    "bad/zero_bytes": "decode",
    "bad/bomb": "decode",
    "bad/vanishes": "read",
}


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def build_bucket(root: Path, scratch: Path) -> dict[str, tuple[int, int]]:
    """48 synthetic scenes, photos in odd modes and the bad files of EXPECTED_ERRORS under root.

    Returns image_id → (width, height) expected after decoding, for the inputs that must succeed.
    """
    synthetic = write_synthetic_dataset(scratch, num_train=48, num_val=0, seed=3)
    sizes = {}
    for path in sorted((synthetic.images_dir / "train").glob("*.png")):
        (root / "scenes").mkdir(parents=True, exist_ok=True)
        (root / "scenes" / path.name).write_bytes(path.read_bytes())
        sizes[f"scenes/{path.stem}"] = (96, 96)
    photos = root / "photos"
    photos.mkdir()
    chelsea = Image.fromarray(skdata.chelsea())  # 451 x 300
    coffee = Image.fromarray(skdata.coffee())
    camera = Image.fromarray(skdata.camera())  # grayscale 512 x 512
    (photos / "gray.png").write_bytes(_encode(camera, "PNG"))
    (photos / "cmyk.jpg").write_bytes(_encode(coffee.convert("CMYK"), "JPEG"))
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(128)
    (photos / "rgba.png").write_bytes(_encode(rgba, "PNG"))
    sixteen = Image.fromarray((np.asarray(camera, dtype=np.uint16) * 257)).convert("I;16")
    (photos / "gray16.png").write_bytes(_encode(sixteen, "PNG"))
    (photos / "palette.gif").write_bytes(_encode(chelsea.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    (photos / "exif_rotated.jpg").write_bytes(_encode(chelsea, "JPEG", exif=exif))
    (photos / "astronaut.jpg").write_bytes(_encode(Image.fromarray(skdata.astronaut()), "JPEG"))
    sizes.update({"photos/gray": (512, 512), "photos/cmyk": coffee.size, "photos/rgba": chelsea.size,
                  "photos/gray16": (512, 512), "photos/palette": chelsea.size,
                  "photos/exif_rotated": (chelsea.size[1], chelsea.size[0]), "photos/astronaut": (512, 512)})
    bad = root / "bad"
    bad.mkdir()
    jpeg = _encode(coffee, "JPEG")
    (bad / "corrupt_jpeg.jpg").write_bytes(jpeg[:2] + bytes(range(256)) * 4 + jpeg[1026:])
    png = _encode(chelsea, "PNG")
    (bad / "truncated_png.png").write_bytes(png[: len(png) // 2])
    (bad / "text_named_jpg.jpg").write_text("这不是图片 / not an image\n", encoding="utf-8")
    (bad / "zero_bytes.png").write_bytes(b"")
    (bad / "bomb.png").write_bytes(_encode(Image.new("L", (BOMB_SIDE, BOMB_SIDE)), "PNG"))
    (bad / "vanishes.png").write_bytes(png)
    return sizes


def tiny_card(input_uri: str, output: str, **overrides) -> ExtractCard:
    card = load_card(ExtractCard, REPO / "jobs" / "extract_tiny.yaml",
                     [f"input.uri={input_uri}", f"output={output}", f"input.max_pixels={MAX_PIXELS}"])
    return card.model_copy(update=overrides)


def read_outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    features = pq.read_table(out / "features")
    errors = pq.read_table(out / "errors")
    assert features.schema.equals(FEATURES_SCHEMA, check_metadata=False), features.schema
    assert errors.schema.equals(ERRORS_SCHEMA, check_metadata=False), errors.schema
    return features.to_pandas(), errors.to_pandas()


def check_outputs(features: pd.DataFrame, errors: pd.DataFrame, sizes: dict[str, tuple[int, int]]) -> None:
    """features + errors = inputs, each input once; errors carry the expected stage and a reason."""
    assert sorted(features.image_id) == sorted(sizes)
    assert dict(zip(errors.image_id, errors.stage)) == EXPECTED_ERRORS
    assert len(errors) == len(EXPECTED_ERRORS) and errors.error.str.len().min() > 10
    assert "max_pixels" in errors.set_index("image_id").error["bad/bomb"]
    for row in features.itertuples():
        assert (row.width, row.height) == sizes[row.image_id], row.image_id
        regions = np.stack(row.features)
        assert regions.shape == (10, REGION_DIM) and np.isfinite(regions).all()  # min_boxes = max_boxes = 10
        assert len(row.tags) == len(row.labels) == len(row.scores) == len(row.boxes) == len(regions)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int]]]:
    root = tmp_path_factory.mktemp("bucket")
    return root / "images", build_bucket(root / "images", root / "synthetic")


def _vanishing_listing(victim: Path):
    """list_inputs that deletes `victim` right after listing it (a path vanishing between listing and reading)."""
    real = extract.list_inputs

    def listing(section):
        rows = real(section)
        victim.unlink()
        return rows

    return listing


def test_every_input_lands_once_and_rerun_recomputes_nothing(ray_local, bucket, tmp_path, monkeypatch) -> None:
    images, sizes = bucket
    victim = images / "bad" / "vanishes.png"
    restore = victim.read_bytes()
    monkeypatch.setattr(extract, "list_inputs", _vanishing_listing(victim))
    out = tmp_path / "extracted"
    try:
        summary = extract.run_extract(tiny_card(str(images), str(out), job_id="job-1"))
    finally:
        victim.write_bytes(restore)
    total = len(sizes) + len(EXPECTED_ERRORS)
    assert total >= 60
    assert summary["inputs"] == summary["processed"] == total and summary["skipped"] == 0
    assert summary["done"] == len(sizes)
    assert summary["failed"] == {"read": 1, "access": 0, "decode": 5, "detect": 0} and summary["images_per_s"] > 0
    features, errors = read_outputs(out)
    check_outputs(features, errors, sizes)
    assert set(errors.job_id) == {"job-1"}
    assert json.loads((out / "summary.json").read_text()) == summary

    assert errors.set_index("image_id").transient.to_dict() == {i: s == "read" for i, s in EXPECTED_ERRORS.items()}

    monkeypatch.undo()  # the vanished file is back: its transient read error is tried again (retry_failed: transient)
    again = extract.run_extract(tiny_card(str(images), str(out), job_id="job-2"))
    assert (again["skipped"], again["processed"], again["done"], again["failed_total"]) == (total - 1, 1, 1, 0)
    assert again["retried"] == 1
    features2, errors2 = read_outputs(out)
    assert len(features2) == len(features) + 1 and len(errors2) == len(errors) - 1
    assert "bad/vanishes" in set(features2.image_id) and "bad/vanishes" not in set(errors2.image_id)
    third = extract.run_extract(tiny_card(str(images), str(out), job_id="job-3"))
    assert (third["skipped"], third["processed"], third["retried"]) == (total, 0, 0)
    assert sorted(p.name for p in out.iterdir()) == ["errors", "features", "summary.json"]  # no staging left


class Crash(BaseException):
    """The driver dying between two file moves (a BaseException, so no handler on the way swallows it)."""


def test_a_crash_while_publishing_a_chunk_loses_and_duplicates_nothing(ray_local, bucket, tmp_path, monkeypatch) -> None:
    images, sizes = bucket
    out = tmp_path / "out"
    real = storage.publish_file
    moved: list[str] = []

    def crash_on_second_file(fs, source, target):
        if moved:
            Path(source).write_bytes(Path(source).read_bytes()[:64])  # a staged file torn as by a kill mid-write
            raise Crash(target)
        real(fs, source, target)
        moved.append(target)

    monkeypatch.setattr(storage, "publish_file", crash_on_second_file)
    with pytest.raises(Crash):
        extract.run_extract(tiny_card(str(images), str(out), job_id="job-crash", chunk_size=16))
    monkeypatch.undo()
    assert len(moved) == 1 and any((out / "_staging").rglob("*.parquet"))
    first = pq.read_table(moved[0]).column("image_id").to_pylist()
    torn = out / "features" / "torn-by-an-older-version.parquet"
    torn.write_bytes(Path(moved[0]).read_bytes()[:100])
    summary = extract.run_extract(tiny_card(str(images), str(out), job_id="job-resume", chunk_size=16))
    assert summary["skipped"] == len(first) and summary["quarantined"] == [str(torn)]
    features, errors = read_outputs(out)
    ok = set(sizes) | {"bad/vanishes"}  # nothing vanishes in this run
    assert features.image_id.is_unique and errors.image_id.is_unique and set(features.image_id) == ok
    assert set(errors.image_id) == set(EXPECTED_ERRORS) - {"bad/vanishes"}
    assert not (out / "_staging").exists() and (out / "quarantine" / "features" / torn.name).is_file()


def test_actor_death_loses_and_duplicates_nothing(ray_local, bucket, tmp_path) -> None:
    images, sizes = bucket
    marker = tmp_path / "die-once"
    marker.write_text("armed")

    class DyingOnce(extract.DetectorActor):
        """Kills its own process on its second batch while the marker exists (once, across restarts)."""

        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2 and marker.exists():
                marker.unlink()
                os._exit(1)
            return super().__call__(batch)

    card = tiny_card(str(images), str(tmp_path / "out"), job_id="job-death")
    summary = extract.run_extract(card, actor_cls=DyingOnce)
    assert not marker.exists(), "the injected death did not happen"
    features, errors = read_outputs(tmp_path / "out")
    ok = set(sizes) | {"bad/vanishes"}  # nothing vanishes in this run: that file is a good PNG
    assert summary["done"] == len(features) == len(ok) and set(features.image_id) == ok
    assert features.image_id.is_unique and errors.image_id.is_unique
    assert set(errors.image_id) == set(EXPECTED_ERRORS) - {"bad/vanishes"}


def test_s3_in_s3_out_through_the_cli(bucket, tmp_path, s3_endpoint) -> None:  # noqa: F811
    images, sizes = bucket
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="imgs")
    s3.create_bucket(Bucket="feats")
    for path in images.rglob("*"):
        if path.is_file() and path.name != "vanishes.png":
            s3.upload_file(str(path), "imgs", f"bucket/{path.relative_to(images).as_posix()}")
    card = tiny_card("s3://imgs/bucket", "s3://feats/run1", job_id="job-s3")
    card_path = tmp_path / "card.yaml"
    card_path.write_text(yaml.safe_dump(card.model_dump(mode="json")), encoding="utf-8")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mengzi_ray.cli", "extract", "--config", str(card_path), "--set", "ray.num_cpus=2"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["done"] == len(sizes) and summary["failed_total"] == len(EXPECTED_ERRORS) - 1
    local = tmp_path / "downloaded"
    for obj in s3.list_objects_v2(Bucket="feats", Prefix="run1/")["Contents"]:
        if obj["Key"].endswith("/"):  # directory markers pyarrow creates
            continue
        target = local / obj["Key"][len("run1/"):]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("feats", obj["Key"], str(target))
    features, errors = read_outputs(local)
    assert sorted(features.image_id) == sorted(sizes)
    assert all(s.startswith("s3://imgs/bucket/") for s in features.source)
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["processed"] == 0


def test_manifest_given_boxes_reproduce_synthetic_features_and_too_many_errors_fail(ray_local, tmp_path) -> None:
    synthetic = write_synthetic_dataset(tmp_path / "syn", num_train=6, num_val=0)
    (tmp_path / "note.jpg").write_text("not an image")
    manifest = tmp_path / "manifest.jsonl"
    bad = [{"uri": "missing.png", "image_id": "missing", "boxes": [[0, 0, 5, 5]]},
           {"uri": "note.jpg", "image_id": "note", "boxes": [[0, 0, 5, 5]]}]
    manifest.write_text(synthetic.boxes_path.read_text() + "".join(json.dumps(b) + "\n" for b in bad))
    card = load_card(ExtractCard, REPO / "jobs" / "extract_tiny.yaml", [
        f"input.uri={manifest}", f"output={tmp_path / 'out'}", "detector.backend=given_boxes",
        "detector.given_boxes_featurizer=pixel_crops", "max_error_fraction=0.2", "actors.max_size=1",
    ])
    with pytest.raises(extract.JobFailed, match=r"2 of 8 inputs failed .* above max_error_fraction=0.2"):
        extract.run_extract(card)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["done"], summary["failed"]["read"], summary["failed"]["decode"]) == (6, 1, 1)
    ours = pq.read_table(tmp_path / "out" / "features").sort_by("image_id")
    theirs = pq.read_table(synthetic.features_path).sort_by("image_id")
    # Every column bit for bit, except tags: ours come from the shipped tag vocabulary (label → Chinese), the
    # synthetic set writes its own shape words.
    assert ours.drop_columns(["tags"]).equals(theirs.drop_columns(["tags"]))
