"""Pretraining examples built upstream (the Ray Data stage's function, no Ray here) as each row's own token sides,
polluted, laid out and masked per step from a pool of sides, equal the per-row `make_batch` of the same joined rows
with the same generator and pool rows: 3-way and 2-way pollution, both text_b sample modes, rows with their own
text_b, with the image's tags and with none, pairs long enough to be truncated, across steps that wrap the pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mengzi_ray.data.pretraining import TEXT_COLUMNS, pair_lengths
from mengzi_ray.training.card import PretrainCard
from mengzi_ray.training.tasks import PretrainTask
from tests.upstream_steps import first_rows_prepared, step_batches_equal_make_batch, task_from_card


def make_task(data: Path, root: Path, extra: list[str]) -> PretrainTask:
    return task_from_card(PretrainCard, "pretrain_tiny.yaml", data, root, extra)


def corpus_rows(joined: pa.Table) -> pa.Table:
    """The joined captions as an Oscar+ corpus: every third row has its own (long) text_b, every fifth has no tags
    (so its text_b is empty and only text_a can be swapped), the rest fall back to the image's tags."""
    n = joined.num_rows
    own = [("红色圆形在蓝色正方形左边,绿色三角形在下面" if i % 3 == 0 else None) for i in range(n)]
    tags = [[] if i % 5 == 0 else t for i, t in enumerate(joined.column("tags").to_pylist())]
    table = joined.set_column(joined.column_names.index("tags"), "tags", pa.array(tags, pa.list_(pa.string())))
    return table.append_column("text_b", pa.array(own, pa.string()))


def pop_lengths(a: int, b: int, total: int) -> tuple[int, int]:
    """The original's truncation loop: pop the last token of the longer list (text_b on a tie) until they fit."""
    while a + b > total:
        a, b = (a - 1, b) if a > b else (a, b - 1)
    return a, b


def test_pair_lengths_equal_the_original_pop_loop() -> None:
    for total in range(1, 14):
        a, b = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
        kept_a, kept_b = pair_lengths(a.ravel(), b.ravel(), total)
        want = np.array([pop_lengths(x, y, total) for x, y in zip(a.ravel(), b.ravel())])
        np.testing.assert_array_equal(np.stack([kept_a, kept_b], axis=1), want, err_msg=f"max_total {total}")


@pytest.mark.parametrize("extra", [
    [],
    ["pretrain.textb_sample_mode=0", "pretrain.max_seq_length=16"],  # short: most pairs are truncated
    ["pretrain.texta_false_prob=0.0"],  # 2-way
])
def test_upstream_then_step_batch_builds_the_same_examples_as_make_batch(joined_train_rows, tmp_path: Path, extra: list[str]) -> None:
    data, joined = joined_train_rows
    task = make_task(data, tmp_path, extra)
    batches = step_batches_equal_make_batch(task, corpus_rows(joined), TEXT_COLUMNS, steps=6)  # the 20-row pool wraps
    labels = {label for batch in batches for label in batch["next_sentence_label"].tolist()}
    assert labels == ({0, 1} if "pretrain.texta_false_prob=0.0" in extra else {0, 1, 2})


def test_polluted_sides_come_from_other_images_and_masking_keeps_the_original_rates(joined_train_rows, tmp_path: Path) -> None:
    data, joined = joined_train_rows
    task = make_task(data, tmp_path, [])
    prepared, rng, pool = first_rows_prepared(task, joined)  # the pool holds only these rows: every side is theirs
    ids, image_ids = task.tz.ids, prepared["image_id"]
    sides = {side: [tuple(tokens[:n]) for tokens, n in zip(prepared[f"{side}_ids"], prepared[f"{side}_len"])]
             for side in ("text_a", "text_b")}

    def sources(side: str, tokens: tuple) -> set[str]:
        return {image_ids[j] for j, own in enumerate(sides[side]) if own == tokens}

    chosen = masked = candidates = 0
    for _ in range(60):
        batch = task.step_batch(prepared, rng, pool)
        labels = batch["masked_lm_labels"]
        original = np.where(labels >= 0, labels, batch["input_ids"])
        for i, (row, label) in enumerate(zip(original, batch["next_sentence_label"])):
            seps = np.flatnonzero(row == ids.sep)
            text_a, text_b = tuple(row[1 : seps[0]]), tuple(row[seps[0] + 1 : seps[1]]) if len(seps) > 1 else ()
            if label == 0:
                assert (text_a, text_b) == (sides["text_a"][i], sides["text_b"][i])
            elif label == 1:  # text_b of another image's row
                assert text_a == sides["text_a"][i] and sources("text_b", text_b) - {image_ids[i]}
            else:  # text_a of another image's row
                assert text_b == sides["text_b"][i] and sources("text_a", text_a) - {image_ids[i]}
        text = (batch["attention_mask"][:, : labels.shape[1]] == 1) & ~np.isin(original, [ids.cls, ids.sep])
        assert not ((labels >= 0) & ~text).any()  # never [CLS], [SEP] or padding
        candidates += int(text.sum())
        chosen += int((labels >= 0).sum())
        masked += int(((labels >= 0) & (batch["input_ids"] == ids.mask)).sum())
    assert 0.13 < chosen / candidates < 0.17  # mlm_prob 0.15
    assert 0.77 < masked / chosen < 0.83  # 80% [MASK]; the rest random or kept
