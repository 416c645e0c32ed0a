"""Caption examples built upstream (the Ray Data stage's function, no Ray here) and masked per step equal the
per-row `make_batch` of the same joined rows with the same generator; the loop's data position, cache and
fault-drill log work on the stage's columns as on records."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from mengzi_ray.config import load_card
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.examples import to_records
from mengzi_ray.training.jobs import prepare_init
from mengzi_ray.training.loop import DataPosition, LoopState, _log_ids, micro_batches
from mengzi_ray.training.tasks import CaptionTask, NegativePool, task_for

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture(scope="module")
def data(joined_train_rows) -> Path:
    return joined_train_rows[0]


@pytest.fixture(scope="module")
def joined(joined_train_rows) -> pa.Table:
    return joined_train_rows[1]


@pytest.fixture(scope="module")
def task(data: Path, tmp_path_factory) -> CaptionTask:
    root = tmp_path_factory.mktemp("run")
    card = load_card(CaptionCard, JOBS / "caption_tiny.yaml",
                     [f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={root}"])
    init_dir, _ = prepare_init(card, str(root / "run"))
    return task_for(card, load_tokenizer(init_dir))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upstream_then_step_batch_builds_the_same_examples_as_make_batch(joined: pa.Table, task: CaptionTask, seed: int) -> None:
    build, kwargs = task.upstream()
    rows = joined.slice(0, 16)
    prepared = build(rows, **kwargs)
    assert prepared["image_id"].tolist() == rows.column("image_id").to_pylist()
    assert prepared["text"].tolist() == rows.column("text").to_pylist()
    new_rng, old_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(3):  # consecutive steps: the generators stay in step too
        new = task.step_batch(prepared, new_rng, None)
        old = task.make_batch(to_records(rows), old_rng, NegativePool(64, old_rng))
        assert new.keys() == old.keys()
        for key in old:
            assert new[key].dtype == old[key].dtype, key
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    assert new_rng.bit_generator.state == old_rng.bit_generator.state
    assert new["masked_pos"].sum(1).min() >= 1  # every row has a masked position, as a caption loss needs


def test_masking_is_random_per_step_and_the_prepared_rows_are_untouched(joined: pa.Table, task: CaptionTask) -> None:
    build, kwargs = task.upstream()
    prepared = build(joined.slice(0, 16), **kwargs)
    ids = prepared["input_ids"].copy()
    rng = np.random.default_rng(3)
    first, second = task.step_batch(prepared, rng, None), task.step_batch(prepared, rng, None)
    assert not np.array_equal(first["masked_pos"], second["masked_pos"])
    np.testing.assert_array_equal(prepared["input_ids"], ids)  # masking writes into a copy
    kept = first["masked_pos"] == 0
    np.testing.assert_array_equal(first["input_ids"][kept], ids[kept])


def test_an_empty_block_and_an_empty_caption(joined: pa.Table, task: CaptionTask) -> None:
    build, kwargs = task.upstream()
    empty = build(joined.slice(0, 0), **kwargs)  # a feature block whose images have no text of the split
    c = task.card.caption
    assert empty["input_ids"].shape == (0, c.max_seq_length)
    assert empty["img_feats"].shape == (0, c.max_img_seq_length, task.card.model.img_feature_dim)
    bad = joined.slice(0, 2).set_column(joined.column_names.index("text"), "text", pa.array(["红", "  "]))
    with pytest.raises(ValueError, match="'  ' is empty after normalisation"):
        build(bad, **kwargs)


class ArrayShard:
    """iter_batches over fixed numpy columns, like a DataIterator with batch_format="numpy" (one epoch per call)."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns, self.calls = columns, 0
        self.formats: list[str] = []

    def iter_batches(self, *, batch_size: int, batch_format: str, **_: Any):
        self.calls += 1
        self.formats.append(batch_format)
        rows = len(self.columns["image_id"])
        for start in range(0, rows - batch_size + 1, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.columns.items()}


def test_micro_batches_of_prepared_columns_track_skip_and_cache(joined: pa.Table, task: CaptionTask) -> None:
    build, kwargs = task.upstream()
    columns = build(joined, **kwargs)
    per_epoch = len(columns["image_id"]) // 5
    position = DataPosition()
    shard = ArrayShard(columns)
    stream = micro_batches(shard, 5, 16, position, prepared=True)
    seen = [next(stream)["image_id"].tolist() for _ in range(per_epoch + 2)]
    assert (position.epoch, position.batches) == (1, 2) and shard.formats == ["numpy", "numpy"]
    resumed = micro_batches(ArrayShard(columns), 5, 16, DataPosition(0, 3), prepared=True)
    assert next(resumed)["image_id"].tolist() == seen[3]
    cached_shard = ArrayShard(columns)
    cached = list(islice(micro_batches(cached_shard, 5, 16, DataPosition(), cache=True, seed=7, prepared=True), 3 * per_epoch))
    assert cached_shard.calls == 1  # later epochs are permutations of the worker's cache
    epoch1 = [i for b in cached[per_epoch : 2 * per_epoch] for i in b["image_id"].tolist()]
    assert sorted(epoch1) == sorted(columns["image_id"][: per_epoch * 5].tolist())
    again = list(islice(micro_batches(ArrayShard(columns), 5, 16, DataPosition(1, 2), cache=True, seed=7, prepared=True), 1))
    np.testing.assert_array_equal(again[0]["input_ids"], cached[per_epoch + 2]["input_ids"])  # a resumed cached epoch


def test_fault_drill_log_of_prepared_columns(joined: pa.Table, task: CaptionTask, tmp_path: Path) -> None:
    build, kwargs = task.upstream()
    rows = joined.slice(0, 3)
    _log_ids(str(tmp_path), 0, LoopState(), build(rows, **kwargs))
    _log_ids(str(tmp_path), 0, LoopState(), to_records(rows))
    lines = [json.loads(line) for line in (tmp_path / "step_ids" / "rank0.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines[0]["examples"] == lines[1]["examples"] == [[i, [t]] for i, t in zip(rows.column("image_id").to_pylist(), rows.column("text").to_pylist())]
