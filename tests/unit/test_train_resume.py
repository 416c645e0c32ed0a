"""Resume position of the train loop without Ray: a resumed epoch replays the interrupted run's seeded order and
skips the consumed batches raw, before they are converted to records."""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from mengzi_ray.training import loop
from mengzi_ray.training.loop import DataPosition, micro_batches, shuffle_seed


class SeededShard:
    """Stands in for a Ray Data shard: 40 rows, order shuffled by the local_shuffle_seed it is asked for."""

    def __init__(self) -> None:
        self.seeds: list[int | None] = []

    def iter_batches(self, *, batch_size: int, local_shuffle_seed: int | None, **_: Any) -> Any:
        self.seeds.append(local_shuffle_seed)
        order = np.random.default_rng(local_shuffle_seed).permutation(40)
        for start in range(0, 40 - batch_size + 1, batch_size):
            yield pa.table({"image_id": [f"img{i}" for i in order[start : start + batch_size]]})


def test_a_resumed_epoch_sees_each_remaining_example_once(monkeypatch: pytest.MonkeyPatch) -> None:
    converted: list[int] = []

    def to_records(batch: pa.Table) -> list[str]:
        converted.append(len(batch))
        return batch.column("image_id").to_pylist()

    monkeypatch.setattr(loop, "to_records", to_records)
    first = DataPosition()
    shard = SeededShard()
    interrupted = list(islice(micro_batches(shard, 4, 16, first, seed=7, rank=1), 13))  # epoch 0 and 3 of epoch 1
    assert (first.epoch, first.batches) == (1, 3)
    converted.clear()
    resumed_shard = SeededShard()
    rest = list(islice(micro_batches(resumed_shard, 4, 16, DataPosition(1, 3), seed=7, rank=1), 7))
    assert converted == [4] * 7  # the 3 skipped batches were never converted
    epoch1 = interrupted[10:] + rest  # what epoch 1 delivered across the crash
    ids = [i for batch in epoch1 for i in batch]
    assert sorted(ids) == sorted(f"img{i}" for i in range(40)) and len(set(ids)) == 40  # each example exactly once
    assert resumed_shard.seeds == [shuffle_seed(7, 1, 1)] and shard.seeds == [shuffle_seed(7, 0, 1), shuffle_seed(7, 1, 1)]
    assert len({shuffle_seed(7, e, r) for e in range(3) for r in range(3)}) == 9  # epochs and ranks differ


def test_a_cached_run_resumed_in_a_later_epoch_replays_the_interrupted_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "to_records", lambda batch: batch.column("image_id").to_pylist())
    first = DataPosition()
    shard = SeededShard()
    interrupted = list(islice(micro_batches(shard, 4, 16, first, cache=True, seed=7, rank=0), 25))  # epochs 0, 1 and 5 of 2
    assert (first.epoch, first.batches) == (2, 5) and len(shard.seeds) == 1  # epochs 1 and 2 came from the cache
    resumed_shard = SeededShard()
    rest = list(islice(micro_batches(resumed_shard, 4, 16, DataPosition(2, 5), cache=True, seed=7, rank=0), 5))
    assert resumed_shard.seeds == [shuffle_seed(7, 0, 0)]  # epoch 0 re-read to rebuild the cache, nothing yielded from it
    epoch2 = interrupted[20:] + rest
    ids = [i for batch in epoch2 for i in batch]
    assert sorted(ids) == sorted(f"img{i}" for i in range(40))  # each example of the resumed epoch exactly once
    uninterrupted = list(islice(micro_batches(SeededShard(), 4, 16, DataPosition(), cache=True, seed=7, rank=0), 30))
    assert epoch2 == uninterrupted[20:30]  # the same order as a run that never stopped
