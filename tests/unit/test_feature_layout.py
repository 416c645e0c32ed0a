"""The packed feature layout (features/layout.py) and every reader of region features: old (nested) and new (packed
float32, packed float16) datasets give the same regions to training examples, evaluation, the serving gallery and
the Oscar export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mengzi_ray.data.records import load_image_records
from mengzi_ray.evaluation.feature_io import load_regions
from mengzi_ray.features.card import ExportOscarCard
from mengzi_ray.features.layout import (
    FEATURES_META_KEY, LAYOUTS, features_dim, pack_features, parquet_options, region_arrays_of, to_layout,
    write_features,
)
from mengzi_ray.features.oscar_tsv import decode_regions, run_export
from mengzi_ray.features.schema import FEATURES_SCHEMA, feature_row
from mengzi_ray.serving.gallery import load_gallery
from mengzi_ray.serving.settings import GallerySection
from mengzi_ray.training.examples import feature_dim, to_records

COUNTS = [3, 0, 1, 5]  # regions per image; an image without regions included


def _table(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [
        feature_row(image_id=f"val/{i}", source=f"file:///img/{i}.png", width=64, height=48,
                    boxes=np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1)),
                    appearance=rng.random((n, 2048), dtype=np.float32) * 8, scores=[0.9] * n, labels=["dog"] * n,
                    tags=["狗"] * n, detector="test")
        for i, n in enumerate(COUNTS)
    ]
    return pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA)


def _dataset(tmp_path: Path, layout: str) -> tuple[Path, list[np.ndarray]]:
    table = _table()
    root = tmp_path / layout
    (root / "features").mkdir(parents=True)
    write_features(to_layout(table, layout), str(root / "features" / "part-0.parquet"))
    texts = [{"image_id": f"val/{i}", "text": "一只狗", "kind": "caption", "split": "val"} for i in range(len(COUNTS))]
    (root / "text.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return root, region_arrays_of(table)


def _same(got: list[np.ndarray], want: list[np.ndarray], layout: str) -> None:
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        if layout == "packed_float16":  # lossy: float16 keeps ~3 significant digits
            np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_reader_takes_every_layout(tmp_path: Path, layout: str) -> None:
    root, want = _dataset(tmp_path, layout)
    features = root / "features"
    schema = pq.read_schema(features / "part-0.parquet")
    assert features_dim(schema) == 2054 and feature_dim(str(features)) == 2054
    # training: the one-process join and the Ray Data batch → records path
    records = load_image_records(features / "part-0.parquet", root / "text.jsonl", "val")
    _same([r.features for r in records], want, layout)
    table = pq.read_table(features, columns=["image_id", "features", "tags"])
    batch = table.append_column("text", pa.array(["一只狗"] * table.num_rows))
    _same([r.features for r in to_records(batch)], want, layout)
    # ... also on a slice (Ray Data hands out sliced blocks)
    _same([r.features for r in to_records(batch.slice(1, 2))], want[1:3], layout)
    # evaluation
    regions = load_regions(str(features), [f"val/{i}" for i in range(len(COUNTS))])
    _same([regions[f"val/{i}"][0] for i in range(len(COUNTS))], want, layout)
    # serving gallery
    gallery = load_gallery(GallerySection(features=str(features)))
    _same([r.features for r in gallery.regions], want, layout)
    # Oscar export: the TSV holds float32 of what the dataset stores
    run_export(ExportOscarCard(dataset=str(root), output=str(tmp_path / f"tsv-{layout}")))
    lines = (tmp_path / f"tsv-{layout}" / "features.tsv").read_text().splitlines()
    exported = [decode_regions(line.split("\t")[2], int(line.split("\t")[1])) for line in lines]
    _same(exported, want, layout)


def test_packed_layout_records_dtype_and_dim_and_halves_bytes_with_float16() -> None:
    table = _table()
    packed, half = pack_features(table), pack_features(table, "float16")
    for out, dtype in ((packed, "float32"), (half, "float16")):
        meta = json.loads(out.schema.field("features").metadata[FEATURES_META_KEY])
        assert meta == {"layout": "packed", "dtype": dtype, "dim": 2054}
        assert out.drop_columns(["features"]).equals(table.drop_columns(["features"]))
    assert half.column("features").nbytes * 2 == pytest.approx(packed.column("features").nbytes, rel=0.01)
    assert packed.column("features").to_pylist()[0] == region_arrays_of(table)[0].astype("<f4").tobytes()


def test_packed_reads_are_views_of_the_arrow_buffer() -> None:
    packed = pack_features(_table())
    arrays = region_arrays_of(packed)
    buffer = np.frombuffer(packed.column("features").chunks[0].buffers()[2], np.uint8)
    assert all(np.shares_memory(a, buffer) and not a.flags.writeable for a in arrays if a.size)


def test_bad_packed_data_is_refused_with_the_reason() -> None:
    packed = pack_features(_table())
    bare = packed.cast(packed.schema.set(packed.schema.get_field_index("features"), pa.field("features", pa.large_binary())))
    with pytest.raises(ValueError, match="no mengzi.features metadata"):
        region_arrays_of(bare)
    cut = packed.set_column(packed.schema.get_field_index("features"), packed.schema.field("features"),
                            pa.array([b"\x00" * 10] * packed.num_rows, pa.large_binary()))
    with pytest.raises(ValueError, match="not a multiple of 2054 x float32"):
        region_arrays_of(cut)
    with pytest.raises(ValueError, match="already packed"):
        pack_features(packed)
    with pytest.raises(ValueError, match="float16 range"):
        table = _table()
        big = [[[7e4] * 2054] * n for n in COUNTS]
        pack_features(table.set_column(table.schema.get_field_index("features"), "features",
                                       pa.array(big, FEATURES_SCHEMA.field("features").type)), "float16")
    with pytest.raises(ValueError, match="feature layout must be one of"):
        to_layout(_table(), "zip")


def test_write_options_leave_the_feature_column_plain() -> None:
    options = parquet_options(FEATURES_SCHEMA, bytes_per_row=1 << 20)
    assert options["compression"]["features"] == "none" and "features" not in options["write_statistics"]
    assert "features" not in options["use_dictionary"] and options["row_group_size"] == 64
