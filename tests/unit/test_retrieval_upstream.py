"""Retrieval examples built upstream (the Ray Data stage's function, no Ray here) as text and image sides, with
negatives drawn and pairs composed per step from a pool of sides, equal the per-row `make_batch` of the same joined
rows with the same generator and pool rows: every attention-mask type, with and without tags, with and without the
dual-encoder section, across steps that wrap the pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mengzi_ray.config import load_card
from mengzi_ray.data.dual_encoder import SIDE_COLUMNS
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import RetrievalCard
from mengzi_ray.training.dual_objective import KEY, image_keys
from mengzi_ray.training.examples import to_records
from mengzi_ray.training.jobs import prepare_init
from mengzi_ray.training.negatives import NegativePool, PreparedPool, draw_others
from mengzi_ray.training.tasks import RetrievalTask, task_for

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def make_task(data: Path, root: Path, extra: list[str]) -> RetrievalTask:
    card = load_card(RetrievalCard, JOBS / "retrieval_tiny.yaml",
                     [f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={root}", *extra])
    init_dir, _ = prepare_init(card, str(root / "run"))
    return task_for(card, load_tokenizer(init_dir))


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
    build, kwargs = task.upstream()
    new_rng, old_rng = np.random.default_rng(7), np.random.default_rng(7)
    new_pool, old_pool = PreparedPool(20, new_rng, SIDE_COLUMNS), NegativePool(20, old_rng)
    for start in range(0, 40, 8):  # five steps of 8 rows through a 20-row pool: it wraps
        rows = joined.slice(start % (joined.num_rows - 8), 8)
        prepared = build(rows, **kwargs)
        assert prepared["image_id"].tolist() == rows.column("image_id").to_pylist()
        assert prepared[KEY].tolist() == image_keys(rows.column("image_id").to_pylist()).tolist()
        records = to_records(rows)
        new = task.step_batch(prepared, new_rng, new_pool)
        old_pool.add(records)
        old = task.make_batch(records, old_rng, old_pool)
        assert new.keys() == old.keys()
        for key in old:
            assert new[key].dtype == old[key].dtype, key
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    assert new_rng.bit_generator.state == old_rng.bit_generator.state
    assert new["labels"].tolist() == [1] * 8 + [0] * 8


def test_negatives_are_of_other_images_and_both_kinds_of_swap_occur(joined_train_rows, tmp_path: Path) -> None:
    data, joined = joined_train_rows
    task = make_task(data, tmp_path, [])
    build, kwargs = task.upstream()
    rng = np.random.default_rng(0)
    pool = task.negative_pool(rng)
    prepared = build(joined.slice(0, 16), **kwargs)
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
