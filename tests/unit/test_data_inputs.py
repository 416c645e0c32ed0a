"""Example builders against layouts computed by hand from microsoft/Oscar `oscar/datasets/oscar_tsv.py`,
`oscar/run_captioning.py` and `oscar/run_retrieval.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.pretraining import PretrainLayout, PretrainTensorizer, pair_lengths, pollution_plan
from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer, negative_pair
from mengzi_ray.text import load_tokenizer
from tests.conftest import TINY_VOCAB

ID = {tok: i for i, tok in enumerate(TINY_VOCAB)}
D = 4


@pytest.fixture
def tokenizer(tiny_vocab_file: Path):
    return load_tokenizer(tiny_vocab_file.parent)


def caption_layout() -> CaptionLayout:
    return CaptionLayout(max_seq_a_length=6, max_seq_length=9, max_img_seq_length=3, img_feature_dim=D)


def test_caption_train_layout_by_hand(tokenizer) -> None:
    tz = CaptionTensorizer(tokenizer, caption_layout())
    ex = tz.train_example("紅的圓", "圆 方 红", np.ones((2, D)), np.random.default_rng(0))  # traditional → simplified
    # [CLS] 红 的 圆 [SEP] [PAD] | 圆 方 [SEP]  (tags truncated to L - A - 1 = 2 tokens)
    unmasked = [ID["[CLS]"], ID["红"], ID["的"], ID["圆"], ID["[SEP]"], ID["[PAD]"], ID["圆"], ID["方"], ID["[SEP]"]]
    pos = np.flatnonzero(ex["masked_pos"])
    assert len(pos) == 1 and 1 <= pos[0] <= 4  # n = min(max(round(0.15 * 5), 1), 3) = 1; never [CLS]
    assert ex["masked_ids"].tolist() == [unmasked[pos[0]], 0, 0]
    same = [i for i in range(9) if i != pos[0]]
    assert ex["input_ids"][same].tolist() == [unmasked[i] for i in same]
    assert ex["token_type_ids"].tolist() == [0] * 6 + [1] * 3
    m = ex["attention_mask"]
    assert m.shape == (12, 12)
    expected = np.zeros((12, 12), dtype=int)
    for r in range(5):  # caption: causal, plus tags (6..8) and the 2 real regions (9, 10)
        expected[r, : r + 1] = 1
        expected[r, 6:11] = 1
    expected[6:11, 6:11] = 1  # tags and regions see each other, never the caption; row/col 5 (pad), 11 (pad region) 0
    np.testing.assert_array_equal(m, expected)
    assert ex["img_feats"].shape == (3, D) and not ex["img_feats"][2].any()


def test_caption_masking_rates_and_closing_sep(tokenizer) -> None:
    tz = CaptionTensorizer(tokenizer, CaptionLayout(max_seq_a_length=12, max_seq_length=16, max_img_seq_length=2, img_feature_dim=D))
    rng = np.random.default_rng(1)
    sep_masked = mask_tokens = total = 0
    for _ in range(600):
        ex = tz.train_example("红色的圆在蓝色的方形左边", "", np.ones((1, D)), rng)  # 12 chars → 10 kept + CLS + SEP
        pos = np.flatnonzero(ex["masked_pos"])
        assert len(pos) == 2  # round(0.15 * 12) = 2
        sep_masked += int(11 in pos)
        mask_tokens += int((ex["input_ids"][pos] == ID["[MASK]"]).sum())
        total += len(pos)
    assert sep_masked > 0  # the closing [SEP] is a candidate: the model learns to stop
    assert 0.74 < mask_tokens / total < 0.86  # 80% become [MASK]


def test_caption_test_layout(tokenizer) -> None:
    lay = caption_layout().for_generation(5)
    assert (lay.max_seq_a_length, lay.max_seq_length) == (5, 8)  # L_test = G + (L_train − A_train)
    ex = CaptionTensorizer(tokenizer, lay).test_example("方", np.ones((3, D)))
    assert ex["input_ids"].tolist() == [ID["[CLS]"], ID["[MASK]"], ID["[MASK]"], ID["[MASK]"], ID["[SEP]"], ID["方"], ID["[SEP]"], ID["[PAD]"]]
    assert ex["masked_pos"].tolist() == [1] * 8
    assert ex["attention_mask"][4, :5].tolist() == [1, 1, 1, 1, 1] and ex["attention_mask"][1, 2] == 0


def test_bad_caption_inputs(tokenizer) -> None:
    tz = CaptionTensorizer(tokenizer, caption_layout())
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="empty after normalisation"):
        tz.train_example("   ", None, np.ones((1, D)), rng)
    with pytest.raises(ValueError, match=r"region features must be \(N, 4\)"):
        tz.train_example("红", None, np.ones((1, 2054)), rng)
    strict = CaptionTensorizer(tokenizer, CaptionLayout(max_seq_a_length=6, max_seq_length=9, max_img_seq_length=3, img_feature_dim=D, truncate_regions=False))
    with pytest.raises(ValueError, match="5 regions, more than max_img_seq_length 3"):
        strict.train_example("红", None, np.ones((5, D)), rng)
    assert tz.train_example("红", None, np.ones((5, D)), rng)["img_feats"].shape == (3, D)  # original: keep the first R


def test_pollution_split_is_half_quarter_quarter() -> None:
    plan = pollution_plan(np.ones(8000, dtype=bool), np.random.default_rng(0), 0.25, 3)
    freq = np.bincount(plan.labels, minlength=3) / len(plan.labels)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.02)
    no_b = pollution_plan(np.zeros(8000, dtype=bool), np.random.default_rng(3), 0.25, 3)
    assert not no_b.swap_b.any() and set(no_b.labels.tolist()) == {0, 2}  # nothing to swap: text_a goes instead


def test_pretrain_example_layout(tokenizer) -> None:
    assert [v.tolist() for v in pair_lengths(np.array([7]), np.array([3]), 6)] == [[3], [3]]
    tz = PretrainTensorizer(tokenizer, PretrainLayout(max_seq_length=10, max_img_seq_length=2, img_feature_dim=D, mlm_prob=0.0))
    ex = tz.example("红的圆", "方", 2, np.ones((1, D)), np.random.default_rng(0))
    assert ex["input_ids"].tolist() == [ID["[CLS]"], ID["红"], ID["的"], ID["圆"], ID["[SEP]"], ID["方"], ID["[SEP]"], 0, 0, 0]
    assert ex["token_type_ids"].tolist() == [0] * 5 + [1] * 2 + [0] * 3
    assert ex["attention_mask"].tolist() == [1] * 7 + [0] * 3 + [1, 0]
    assert ex["masked_lm_labels"].tolist() == [-1] * 10 and int(ex["next_sentence_label"]) == 2
    masked = PretrainTensorizer(tokenizer, PretrainLayout(max_seq_length=10, max_img_seq_length=2, img_feature_dim=D, mlm_prob=1.0))
    ex = masked.example("红的圆", "方", 0, np.ones((1, D)), np.random.default_rng(0))
    assert ex["masked_lm_labels"].tolist() == [-1, ID["红"], ID["的"], ID["圆"], -1, ID["方"], -1, -1, -1, -1]
    assert PretrainLayout(texta_false_prob=0.25).num_contrast_classes == 3
    assert PretrainLayout(texta_false_prob=0.0).num_contrast_classes == 2


@pytest.mark.parametrize("kind", ["CLR", "CL", "CR", "LR"])
def test_retrieval_masks(tokenizer, kind: str) -> None:
    tz = RetrievalTensorizer(tokenizer, RetrievalLayout(max_seq_length=7, max_img_seq_length=2, img_feature_dim=D, att_mask_type=kind))
    ex = tz.example("红圆", "方", np.ones((1, D)), label=1)
    assert ex["input_ids"].tolist() == [ID["[CLS]"], ID["红"], ID["圆"], ID["[SEP]"], ID["方"], ID["[SEP]"], 0]
    assert ex["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 0]
    m = ex["attention_mask"]
    if kind == "CLR":
        assert m.tolist() == [1] * 6 + [0] + [1, 0]
        return
    C, L, R = range(0, 4), range(4, 6), range(7, 8)
    allowed = {("C", "C"), ("L", "L"), ("R", "R"), (kind[0], kind[1]), (kind[1], kind[0])}
    spans = {"C": C, "L": L, "R": R}
    for a, ra in spans.items():
        for b, rb in spans.items():
            assert (m[np.ix_(list(ra), list(rb))] == int((a, b) in allowed)).all(), (a, b)
    assert not m[6].any() and not m[:, 8].any()


def test_retrieval_caption_filling_the_budget_gets_no_tags(tokenizer) -> None:
    tz = RetrievalTensorizer(tokenizer, RetrievalLayout(max_seq_length=4, max_img_seq_length=1, img_feature_dim=D))
    ex = tz.example("红的圆方", "方", np.ones((1, D)))
    assert ex["input_ids"].tolist() == [ID["[CLS]"], ID["红"], ID["的"], ID["[SEP]"]]  # never longer than L


def test_negative_pair_is_another_image() -> None:
    rng = np.random.default_rng(0)
    draws = [negative_pair(2, 4, rng) for _ in range(400)]
    assert {o for _, o in draws} == {0, 1, 3}
    kinds = [k for k, _ in draws]
    assert 0.4 < kinds.count("caption") / len(kinds) < 0.6
    with pytest.raises(ValueError, match="at least 2 images"):
        negative_pair(0, 1, rng)
