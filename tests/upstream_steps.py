"""Shared by the tests of the tasks that build their examples upstream (tests/unit/test_*_upstream.py): a task
from a tiny job card, and the check that the upstream stage plus `step_batch` equals `make_batch` row by row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from mengzi_ray.config import load_card
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.examples import to_records
from mengzi_ray.training.jobs import prepare_init
from mengzi_ray.training.negatives import NegativePool, PreparedPool
from mengzi_ray.training.tasks import Task, task_for

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def task_from_card(card_class: type, card_file: str, data: Path, root: Path, extra: list[str]) -> Task:
    """The task of jobs/<card_file> on the synthetic dataset at `data`, with `extra` overrides and a fresh init."""
    card = load_card(card_class, JOBS / card_file,
                     [f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={root}", *extra])
    init_dir, _ = prepare_init(card, str(root / "run"))
    return task_for(card, load_tokenizer(init_dir))


def step_batches_equal_make_batch(task: Task, joined: pa.Table, keys: tuple[str, ...], steps: int) -> list[dict]:
    """`steps` micro-batches of 8 joined rows through the upstream stage and `step_batch` (a PreparedPool of 20 rows
    of `keys`) and, with a generator of the same seed, through records and `make_batch` (a NegativePool of 20): the
    pool wraps. Asserts equal keys, dtypes and arrays per step and equal generator states at the end; returns the
    upstream path's batches."""
    build, kwargs = task.upstream()
    new_rng, old_rng = np.random.default_rng(7), np.random.default_rng(7)
    new_pool, old_pool = PreparedPool(20, new_rng, keys), NegativePool(20, old_rng)
    batches = []
    for start in range(0, 8 * steps, 8):
        rows = joined.slice(start % (joined.num_rows - 8), 8)
        prepared = build(rows, **kwargs)
        assert prepared["image_id"].tolist() == rows.column("image_id").to_pylist()
        records = to_records(rows)
        new = task.step_batch(prepared, new_rng, new_pool)
        old_pool.add(records)
        old = task.make_batch(records, old_rng, old_pool)
        assert new.keys() == old.keys()
        for key in old:
            assert new[key].dtype == old[key].dtype, key
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)
        batches.append(new)
    assert new_rng.bit_generator.state == old_rng.bit_generator.state
    return batches


def first_rows_prepared(task: Task, joined: pa.Table, rows: int = 16) -> tuple[dict, np.random.Generator, PreparedPool]:
    """The first `rows` joined rows through the upstream stage, a generator (seed 0) and the task's own empty pool."""
    build, kwargs = task.upstream()
    rng = np.random.default_rng(0)
    return build(joined.slice(0, rows), **kwargs), rng, task.negative_pool(rng)
