"""Where a worker's negatives come from in a streaming setting (pretraining pollution, retrieval negatives).

Each worker keeps the last `capacity` rows its shard delivered (the current batch included). The shard is a
uniform shuffle of the corpus (block order randomised per epoch plus a local shuffle buffer), so a uniform draw
from them is a draw of a random corpus document, as the original's `random.randint(0, len(dataset))`; like the
original, a draw that hits the same image is retried (up to 10 draws in all).

Two stores of the same rows: `NegativePool` holds joined rows as ImageRecords (tasks that build examples in the
worker), `PreparedPool` holds the columns of a task's upstream stage (retrieval: each row's tokenised text and
image sides) in preallocated arrays, so drawing B negatives and writing them beside their positives is a few
vectorised numpy calls. Both
draw through `draw_others`, so the same rows and generator give the same negatives in either store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mengzi_ray.data.records import ImageRecord

DRAWS = 10
"""Draws per negative before a same-image row is accepted (the original retries, then gives up)."""


def draw_others(pool_ids: np.ndarray, image_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per query image id, an index into `pool_ids` (the pool's rows' image ids, in ring-slot order) of a row of another
    image: one uniform draw for every query, then redraws of the queries that hit their own image, DRAWS in all."""
    if len(pool_ids) == 0:
        raise ValueError("negative pool is empty: add the current batch before drawing")
    picked = rng.integers(len(pool_ids), size=len(image_ids))
    for _ in range(DRAWS - 1):
        clash = np.flatnonzero(pool_ids[picked] == image_ids)
        if clash.size == 0:
            break
        picked[clash] = rng.integers(len(pool_ids), size=clash.size)
    return picked


class NegativePool:
    """The last `capacity` ImageRecords in an `ArrayRing` (the slots `PreparedPool` uses, so both draw the same rows);
    `others(image_ids)` draws a row of a different image per id."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.ring = ArrayRing(capacity)
        self.rng = rng

    def add(self, rows: Sequence[ImageRecord]) -> None:
        records = np.empty(len(rows), dtype=object)
        records[:] = list(rows)
        self.ring.add({"record": records, "image_id": np.array([r.image_id for r in rows], dtype=object)})

    def others(self, image_ids: Sequence[str]) -> list[ImageRecord]:
        """One row of a different image per id (`draw_others`)."""
        picked = draw_others(self.ring.columns["image_id"][: self.ring.size], np.array(image_ids, dtype=object), self.rng)
        return [self.ring.columns["record"][i] for i in picked]


class ArrayRing:
    """Preallocated (capacity, ...) numpy columns written as a ring: the last `capacity` rows added, in slots
    `0..size-1` (slot order is not age order once the ring has wrapped). Columns are allocated on the first `add`
    from its shapes and dtypes; np.zeros pages are only resident once written."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ring capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.size = 0
        self._next = 0
        self.columns: dict[str, np.ndarray] = {}

    def add(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Write rows (every column has the same leading length n), overwriting the oldest; the slots written."""
        count = len(next(iter(columns.values())))
        keep = min(count, self.capacity)
        if not self.columns:
            self.columns = {k: np.zeros((self.capacity, *np.shape(v)[1:]), dtype=np.asarray(v).dtype) for k, v in columns.items()}
        slots = (self._next + np.arange(keep)) % self.capacity
        for k, v in columns.items():
            self.columns[k][slots] = np.asarray(v)[count - keep :]
        self._next = int((self._next + keep) % self.capacity)
        self.size = min(self.size + keep, self.capacity)
        return slots


class PreparedPool:
    """The last `capacity` rows of an upstream stage's columns (`keys`, plus their `image_id`), for negatives.

    Memory: capacity × the row's bytes, e.g. 1,024 retrieval rows of 50 padded regions of 2,054 floats ≈ 420 MB
    (a NegativePool of the same rows holds their unpadded regions instead)."""

    def __init__(self, capacity: int, rng: np.random.Generator, keys: Sequence[str]):
        self.ring = ArrayRing(capacity)
        self.image_ids = np.empty(capacity, dtype=object)
        self.rng = rng
        self.keys = tuple(keys)

    def add(self, prepared: Mapping[str, np.ndarray]) -> None:
        slots = self.ring.add({k: prepared[k] for k in self.keys})
        self.image_ids[slots] = np.asarray(prepared["image_id"], dtype=object)[len(prepared["image_id"]) - len(slots) :]

    def draw(self, image_ids: np.ndarray) -> np.ndarray:
        """Per id, the ring slot of a pool row of a different image (`draw_others`)."""
        return draw_others(self.image_ids[: self.ring.size], np.asarray(image_ids, dtype=object), self.rng)

    def with_negatives(self, own: np.ndarray, key: str, slots: np.ndarray, from_pool: np.ndarray) -> np.ndarray:
        """(2B, ...): the B rows of `own` (a batch's column `key`), then for each row i the pool's row slots[i] where
        from_pool[i], else own[i] again. Every row is written once: no concatenated or gathered temporaries, which
        for 50 padded regions a row would be most of the step's data work."""
        size = len(own)
        out = np.empty((2 * size, *own.shape[1:]), dtype=own.dtype)
        out[:size] = own
        negatives = out[size:]
        negatives[~from_pool] = own[~from_pool]
        negatives[from_pool] = self.ring.columns[key][slots[from_pool]]
        return out
