"""The extract job's streaming stages without Ray: decode blocks bounded by pixel bytes, write tasks' parts."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mengzi_ray.features.card import DetectorSection, InputSection
from mengzi_ray.features.extract import DetectorActor, decode_blocks, read_and_decode, write_parts
from mengzi_ray.features.inputs import list_inputs


def _bucket(root: Path, count: int, size: tuple[int, int]) -> pa.Table:
    root.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (i * 20 % 256, 0, 0)).save(root / f"{i:02d}.png")
    return pa.Table.from_pylist(list_inputs(InputSection(uri=str(root))))


def test_decode_blocks_are_cut_by_pixel_bytes_not_rows(tmp_path: Path) -> None:
    big, small = _bucket(tmp_path / "big", 6, (400, 300)), _bucket(tmp_path / "small", 6, (20, 10))
    budget = 2 * 400 * 300 * 3  # two large images
    big_blocks = list(decode_blocks(big, 10**7, budget))
    small_blocks = list(decode_blocks(small, 10**7, budget))
    assert [len(b) for b in big_blocks] == [2, 2, 2]
    assert all(sum(len(p) for p in b.column("pixels").to_pylist()) <= budget for b in big_blocks)
    assert [len(b) for b in small_blocks] == [6]  # thumbnails: the whole batch is one block
    # the blocks together are exactly the one-table decode, failures included
    big = pa.concat_tables([big, pa.Table.from_pylist([{"source": (tmp_path / "gone.png").as_uri(),
                                                         "image_id": "gone", "boxes_json": "", "labels_json": ""}])])
    assert pa.concat_tables(decode_blocks(big, 10**7, budget)).equals(read_and_decode(big, 10**7))


def test_write_parts_splits_features_and_errors_and_a_retry_overwrites(tmp_path: Path) -> None:
    rows = _bucket(tmp_path / "in", 3, (20, 10)).to_pylist()
    rows.append({"source": (tmp_path / "gone.png").as_uri(), "image_id": "gone", "boxes_json": "", "labels_json": ""})
    for row in rows[:3]:
        row["boxes_json"] = "[[0, 0, 5, 5]]"
    section = DetectorSection(backend="given_boxes", given_boxes_featurizer="pixel_crops")
    results = DetectorActor(section.model_dump())(read_and_decode(pa.Table.from_pylist(rows), 10**7))
    staging = str(tmp_path / "out" / "_staging" / "job")
    first = write_parts(results, str(tmp_path / "out"), staging, "nested", "job-1").to_pylist()
    again = write_parts(results, str(tmp_path / "out"), staging, "nested", "job-1").to_pylist()
    assert first == again  # same batch, same names: a retried task replaces its files
    parts = {r["image_id"]: r["part"] for r in first}
    assert {r["image_id"]: r["stage"] for r in first} == {"00": "", "01": "", "02": "", "gone": "read"}
    assert parts["gone"].startswith("errors/job-1-") and parts["00"].startswith("features/job-1-")
    files = sorted(p.relative_to(staging).as_posix() for p in Path(staging).rglob("*.parquet"))
    assert files == sorted(set(parts.values()))
    features = pq.read_table(Path(staging) / parts["00"])
    assert features.column("image_id").to_pylist() == ["00", "01", "02"]
    errors = pq.read_table(Path(staging) / parts["gone"]).to_pylist()
    assert [(e["image_id"], e["stage"], e["job_id"], e["transient"]) for e in errors] == [("gone", "read", "job-1", True)]
