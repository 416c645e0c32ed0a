"""Pretraining on an imported Oscar+ corpus: text_b is the row's own (tags or QA answers), the 3-way labels follow
the original's dice (u > 0.5 matched, u > texta_false_prob text_b swapped, else text_a swapped) and the polluted
text_b comes from another document as textb_sample_mode says."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from mengzi_ray.data.pretraining import pollution_plan
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.training.examples import _attach_texts, to_records


def test_first_draws_against_hand_computed_labels() -> None:
    # default_rng(0).random(5) gives 0.637, 0.270, 0.041, 0.017, 0.813: matched, text_b swapped, text_a swapped ×2,
    # matched (texta_false_prob 0.25, 3 classes); a pair without text_b swaps text_a instead of text_b
    plan = pollution_plan(np.ones(5, dtype=bool), np.random.default_rng(0), 0.25, 3)
    assert plan.labels.tolist() == [0, 1, 2, 2, 0]
    assert plan.swap_b.tolist() == [False, True, False, False, False]
    assert plan.swap_a.tolist() == [False, False, True, True, False]
    assert not plan.b_is_other_a.any()  # mode 1: always the other document's text_b
    no_b = pollution_plan(np.array([True, False, True, True, True]), np.random.default_rng(0), 0.25, 3)
    assert no_b.labels.tolist() == [0, 2, 2, 2, 0] and no_b.polluted.tolist() == [False, True, True, True, False]


def test_label_distribution_and_text_b_sources_on_a_fixed_seed() -> None:
    n = 40_000
    plan = pollution_plan(np.ones(n, dtype=bool), np.random.default_rng(1), 0.25, 3, textb_sample_mode=0)
    labels = Counter(plan.labels.tolist())
    assert abs(labels[0] / n - 0.5) < 0.01 and abs(labels[1] / n - 0.25) < 0.01 and abs(labels[2] / n - 0.25) < 0.01
    # mode 0: a random line of the other document, text_a or text_b with p = 0.5; only swapped text_b uses the coin
    assert abs(plan.b_is_other_a[plan.swap_b].mean() - 0.5) < 0.02 and not plan.b_is_other_a[~plan.swap_b].any()
    # 2-way (texta_false_prob 0): labels 0 and 1 only; a polluted pair then has its text_b swapped
    two = pollution_plan(np.ones(2000, dtype=bool), np.random.default_rng(2), 0.0, 2)
    assert set(two.labels.tolist()) == {0, 1} and (two.swap_b == (two.labels == 1)).all() and not two.swap_a.any()


def test_corpus_rows_keep_their_text_b_through_the_join() -> None:
    block = pa.table({"image_id": ["coco_1", "gqa_2"], "features": pa.array([[[0.0] * 4], [[1.0] * 4]],
                      pa.list_(pa.list_(pa.float32(), 4))), "tags": [["狗"], ["草地"]]})
    texts = pa.table({"image_id": ["gqa_2", "coco_1"], "text": ["图里有什么？", "一只狗。"],
                      "text_b": ["狗 草地", "男人 桌子"]})
    rows = to_records(_attach_texts(block, texts, per_image=False))
    assert [(r.image_id, r.texts, r.text_b(0)) for r in sorted(rows, key=lambda r: r.image_id)] == [
        ("coco_1", ["一只狗。"], "男人 桌子"), ("gqa_2", ["图里有什么？"], "狗 草地")]
    grouped = to_records(_attach_texts(block, texts, per_image=True))
    assert {r.image_id: r.texts_b for r in grouped} == {"coco_1": ["男人 桌子"], "gqa_2": ["狗 草地"]}
    plain = to_records(_attach_texts(block, texts.drop(["text_b"]), per_image=False))
    assert {r.image_id: r.text_b(0) for r in plain} == {"coco_1": "狗", "gqa_2": "草地"}  # the image's tags
    assert ImageRecord("x", np.zeros((0, 4)), "猫", ["t"], [None]).text_b() == "猫"
