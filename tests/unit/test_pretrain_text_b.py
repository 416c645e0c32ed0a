"""Pretraining on an imported Oscar+ corpus: text_b is the row's own (tags or QA answers), the 3-way labels follow
the original's dice (u > 0.5 matched, u > texta_false_prob text_b swapped, else text_a swapped) and the polluted
text_b comes from another document as textb_sample_mode says."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from mengzi_ray.data.pretraining import pretrain_pair
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.training.examples import _attach_texts, to_records

QA = ("图里有什么？", "狗 草地")  # a question row: text_b = its answers
OTHER = ("一只猫在沙发上。", "猫 沙发")  # the other document drawn for pollution


def test_first_draws_against_hand_computed_labels() -> None:
    # default_rng(0).random() gives 0.637, 0.270, 0.041, 0.017, 0.813: matched, text_b swapped, text_a swapped ×2,
    # matched (texta_false_prob 0.25, 3 classes; mode 1 draws nothing extra)
    rng = np.random.default_rng(0)
    got = [pretrain_pair(*QA, rng, 0.25, 3, lambda: OTHER, textb_sample_mode=1) for _ in range(5)]
    assert got == [(QA[0], QA[1], 0), (QA[0], OTHER[1], 1), (OTHER[0], QA[1], 2), (OTHER[0], QA[1], 2),
                   (QA[0], QA[1], 0)]


def test_label_distribution_and_text_b_sources_on_a_fixed_seed() -> None:
    rng = np.random.default_rng(1)
    n = 40_000
    labels, swapped_b = Counter(), Counter()
    for _ in range(n):
        a, b, label = pretrain_pair(*QA, rng, 0.25, 3, lambda: OTHER, textb_sample_mode=0)
        labels[label] += 1
        if label == 1:
            swapped_b["text_a" if b == OTHER[0] else "text_b"] += 1
        else:
            assert b == QA[1]  # matched and text_a-swapped pairs keep the row's own answers
    assert abs(labels[0] / n - 0.5) < 0.01 and abs(labels[1] / n - 0.25) < 0.01 and abs(labels[2] / n - 0.25) < 0.01
    # mode 0: a random line of the other document, text_a or text_b with p = 0.5
    assert abs(swapped_b["text_a"] / labels[1] - 0.5) < 0.02
    # 2-way (texta_false_prob 0): labels 0 and 1 only, 1 = text_a swapped
    two = Counter(pretrain_pair(*QA, rng, 0.0, 2, lambda: OTHER)[2] for _ in range(2000))
    assert set(two) == {0, 1}


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
