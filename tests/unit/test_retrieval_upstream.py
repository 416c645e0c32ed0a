"""Retrieval examples built upstream (the Ray Data stage's function, no Ray here) as text and image sides, with
negatives drawn and pairs composed per step from a pool of sides, equal the per-row `make_batch` of the same joined
rows with the same generator and pool rows: every attention-mask type, with and without tags, with and without the
dual-encoder section, across steps that wrap the pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mengzi_ray.data.dual_encoder import SIDE_COLUMNS
from mengzi_ray.training.card import RetrievalCard
from mengzi_ray.training.dual_objective import KEY, image_keys
from mengzi_ray.training.negatives import draw_others
from mengzi_ray.training.tasks import RetrievalTask
from tests.upstream_steps import first_rows_prepared, step_batches_equal_make_batch, task_from_card


def make_task(data: Path, root: Path, extra: list[str]) -> RetrievalTask:
    return task_from_card(RetrievalCard, "retrieval_tiny.yaml", data, root, extra)


@pytest.mark.parametrize("extra", [
    [],
    ["retrieval.att_mask_type=CL"],
    ["retrieval.att_mask_type=LR", "retrieval.max_seq_length=16"],  # short: long captions leave no room for tags
    ["retrieval.att_mask_type=CR", "retrieval.add_od_labels=false"],
    ["retrieval.dual_encoder.enabled=true"],
])
def test_upstream_then_step_batch_builds_the_same_examples_as_make_batch(joined_train_rows, tmp_path: Path, extra: list[str]) -> None:
    data, joined = joined_train_rows
    task = make_task(data, tmp_path, extra)
    batches = step_batches_equal_make_batch(task, joined, SIDE_COLUMNS, steps=5)  # five steps wrap the 20-row pool
    assert batches[-1]["labels"].tolist() == [1] * 8 + [0] * 8
    build, kwargs = task.upstream()
    rows = joined.slice(0, 8)
    assert build(rows, **kwargs)[KEY].tolist() == image_keys(rows.column("image_id").to_pylist()).tolist()


def test_negatives_are_of_other_images_and_both_kinds_of_swap_occur(joined_train_rows, tmp_path: Path) -> None:
    data, joined = joined_train_rows
    task = make_task(data, tmp_path, [])
    prepared, rng, pool = first_rows_prepared(task, joined)
    swapped_caption = swapped_image = 0
    for _ in range(20):
        batch = task.step_batch(prepared, rng, pool)
        same_image = (batch["img_feats"][16:] == batch["img_feats"][:16]).all(axis=(1, 2))  # negatives vs positives
        swapped_caption += int(same_image.sum())
        swapped_image += int((~same_image).sum())
    assert pool.ring.size == min(20 * 16, pool.ring.capacity)
    assert swapped_caption > 100 and swapped_image > 100  # p = 0.5 each over 320 negatives


def test_draw_others_retries_own_image_draws() -> None:
    pool_ids = np.array(["a", "a", "a", "b"], dtype=object)
    picked = draw_others(pool_ids, np.array(["a"] * 200, dtype=object), np.random.default_rng(0))
    assert (pool_ids[picked] == "b").mean() > 0.9  # 10 draws: P(only "a") = 0.75^10 ≈ 0.06
    only_one = draw_others(np.array(["a"], dtype=object), np.array(["a"], dtype=object), np.random.default_rng(0))
    assert only_one.tolist() == [0]  # no other image: the original gives up and keeps the same-image row
    with pytest.raises(ValueError, match="empty"):
        draw_others(np.array([], dtype=object), np.array(["a"], dtype=object), np.random.default_rng(0))


def test_an_empty_block_gives_empty_columns(joined_train_rows, tmp_path: Path) -> None:
    data, joined = joined_train_rows
    task = make_task(data, tmp_path, [])
    build, kwargs = task.upstream()
    empty, one = build(joined.slice(0, 0), **kwargs), build(joined.slice(0, 1), **kwargs)
    assert empty.keys() == one.keys()
    for key in one:
        assert empty[key].shape == (0, *one[key].shape[1:]) and empty[key].dtype.kind == one[key].dtype.kind, key
