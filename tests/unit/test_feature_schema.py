"""The extract job's Parquet files read with plain pyarrow and pandas (no Ray) and match docs/data-contracts.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mengzi_ray.features.card import DetectorSection, InputSection
from mengzi_ray.features.extract import DetectorActor, _errors_only, _features_only, read_and_decode
from mengzi_ray.features.inputs import list_inputs
from tests.unit.test_detector import TINY

# docs/data-contracts.md, written out independently of features/schema.py.
DESIGN_FEATURES = {
    "image_id": "string", "source": "string", "width": "int32", "height": "int32",
    "boxes": "list<element: fixed_size_list<element: float>[4]>",
    "features": "list<element: fixed_size_list<element: float>[2054]>",
    "scores": "list<element: float>", "labels": "list<element: string>", "tags": "list<element: string>",
    "attributes": "list<element: string>", "detector": "string",
    "attribute_lists": "list<element: list<element: string>>",
    "attribute_scores": "list<element: list<element: float>>",
}
DESIGN_ERRORS = {"source": "string", "image_id": "string", "stage": "string", "error": "string",
                 "job_id": "string", "transient": "bool"}


def test_parquet_files_match_the_design_without_ray(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 60, 3), np.uint8)).save(images / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    decoded = read_and_decode(pa.Table.from_pylist(list_inputs(InputSection(uri=str(images)))), 1_000_000)
    result = DetectorActor(DetectorSection(**TINY).model_dump())(decoded)
    pq.write_table(_features_only(result), tmp_path / "features.parquet")
    pq.write_table(_errors_only(result, "job-7"), tmp_path / "errors.parquet")

    features = pq.read_table(tmp_path / "features.parquet")
    errors = pq.read_table(tmp_path / "errors.parquet")
    assert {f.name: str(f.type) for f in features.schema} == DESIGN_FEATURES
    assert {f.name: str(f.type) for f in errors.schema} == DESIGN_ERRORS
    frame = pd.read_parquet(tmp_path / "features.parquet")
    assert sorted(frame.image_id) == ["img0", "img1", "img2"] and frame.width.dtype == np.int32
    regions = np.stack(frame.iloc[1].features)
    assert regions.shape == (len(frame.iloc[1].boxes), 2054) and regions.dtype == np.float32
    np.testing.assert_allclose(regions[:, 2048], np.stack(frame.iloc[1].boxes)[:, 0] / frame.iloc[1].width)
    assert frame.iloc[0].detector.startswith("torchvision_c4:")
    err = pd.read_parquet(tmp_path / "errors.parquet").iloc[0]
    assert (err.image_id, err.stage, err.job_id) == ("broken", "decode", "job-7") and "DecodeError" in err.error


def test_region_arrays_match_the_per_cell_reader_also_on_slices(tmp_path: Path) -> None:
    from mengzi_ray.synthetic import write_synthetic_dataset
    from mengzi_ray.features.schema import region_arrays, region_matrix

    table = pq.read_table(write_synthetic_dataset(tmp_path, num_train=7, num_val=0).features_path)
    for part in (table, table.slice(2, 3), pa.concat_tables([table.slice(0, 2), table.slice(5, 2)])):
        fast = region_arrays(part.column("features"))
        slow = [region_matrix(cell) for cell in part.column("features").to_pylist()]
        assert len(fast) == len(slow) == len(part)
        for a, b in zip(fast, slow):
            np.testing.assert_array_equal(a, b)
