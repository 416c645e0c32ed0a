"""Ranks and R@K on hand-made similarity grids (microsoft/Oscar `oscar/run_retrieval.py` `compute_ranks`)."""

from __future__ import annotations

import numpy as np
import pytest

from mengzi_ray.evaluation.retrieval_metrics import (
    recall_from_ranks,
    rerank_recall,
    retrieval_ranks,
    retrieval_recall,
)


def _oscar_loop_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[list[int], list[int]]:
    """The original's compute_ranks loop, with the argsort made stable (its behaviour on small arrays)."""
    labels = text_to_image[None, :] == np.arange(scores.shape[0])[:, None]

    def ranks(lab: np.ndarray, sim: np.ndarray) -> list[int]:
        out = []
        for row_lab, row_sim in zip(lab, sim):
            inds = np.argsort(row_sim, kind="stable")[::-1]
            out.append(next(r for r, ind in enumerate(inds) if row_lab[ind]))
        return out

    return ranks(labels, scores), ranks(labels.T, scores.T)


def test_hand_made_grid_two_captions_per_image():
    # 3 images, 2 captions each: texts 0,1 → image 0; 2,3 → image 1; 4,5 → image 2.
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],  # image 0: best correct text 0 at position 0
            [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],  # image 1: texts 2 (0.5) and 3 (0.1); 0.7, 0.6 above → rank 2
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.95],  # image 2: text 5 first → rank 0
        ]
    )
    i2t, t2i = retrieval_ranks(scores, text_to_image)
    assert i2t.tolist() == [0, 2, 0]
    # columns: text0 [.9,.7,.1] → image 0 first (0); text1 [.1,.6,.2] → image 0 last (2);
    # text2 [.8,.5,.3] → image 1 second (1); text3 [.2,.1,.4] → image 1 last (2);
    # text4 [.3,.2,.5] → image 2 first (0); text5 [.4,.3,.95] → 0.
    assert t2i.tolist() == [0, 2, 1, 2, 0, 0]
    result = retrieval_recall(scores, text_to_image, ks=(1, 2))
    assert result == pytest.approx(
        {"i2t_R@1": 2 / 3, "i2t_R@2": 2 / 3, "t2i_R@1": 3 / 6, "t2i_R@2": 4 / 6, "rsum": 2 / 3 * 2 + 7 / 6}
    )


def test_default_keys_and_rsum():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12, 24))
    text_to_image = np.repeat(np.arange(12), 2)
    result = retrieval_recall(scores, text_to_image)
    assert list(result) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    assert result["rsum"] == pytest.approx(sum(v for k, v in result.items() if k != "rsum"))
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if k != "rsum")


def test_perfect_scores_give_recall_one():
    text_to_image = np.repeat(np.arange(4), 5)
    scores = (text_to_image[None, :] == np.arange(4)[:, None]).astype(float)
    scores += np.linspace(0, 0.01, 20)[None, :]  # break ties among correct texts, still all above wrong ones
    result = retrieval_recall(scores, text_to_image, ks=(1,))
    assert result == {"i2t_R@1": 1.0, "t2i_R@1": 1.0, "rsum": 2.0}


def test_ties_put_the_higher_index_first_like_reversed_argsort():
    # All scores equal: in each row/column the last index comes first.
    scores = np.zeros((3, 3))
    text_to_image = np.array([0, 1, 2])
    i2t, t2i = retrieval_ranks(scores, text_to_image)
    assert i2t.tolist() == [2, 1, 0]
    assert t2i.tolist() == [2, 1, 0]


def test_tie_between_correct_and_wrong_caption():
    # Image 0's correct text 1 ties with wrong text 2 (higher index → ahead) → rank 1; image 1 wins outright.
    scores = np.array([[0.1, 0.5, 0.5], [0.2, 0.3, 0.9]])
    text_to_image = np.array([0, 0, 1])
    i2t, _ = retrieval_ranks(scores, text_to_image)
    assert i2t.tolist() == [1, 0]


def test_multiple_correct_captions_take_the_best_ranked_one():
    scores = np.array([[0.1, 0.2, 0.3, 0.9, 0.4]])
    text_to_image = np.zeros(5, dtype=int)
    i2t, t2i = retrieval_ranks(scores, text_to_image)
    assert i2t.tolist() == [0]  # text 3 is correct and on top
    assert t2i.tolist() == [0] * 5  # a single image is always first


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_the_original_loop_on_grids_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(7, 14)).astype(float)  # only 4 distinct values → lots of ties
    text_to_image = rng.permutation(np.repeat(np.arange(7), 2))
    i2t, t2i = retrieval_ranks(scores, text_to_image)
    ref_i2t, ref_t2i = _oscar_loop_ranks(scores, text_to_image)
    assert i2t.tolist() == ref_i2t
    assert t2i.tolist() == ref_t2i


def test_rerank_mode_counts_images_without_positive_as_misses():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.7], [0.5, 0.4, 0.3]])
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    result = rerank_recall(scores, labels, ks=(1, 2))
    # ranks: 0, 1, 3 (no positive → num_candidates)
    assert result == pytest.approx({"i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "rsum": 1.0})


def test_recall_from_ranks_i2t_only():
    assert recall_from_ranks(np.array([0, 4, 9, 10]), None, ks=(1, 5, 10)) == pytest.approx(
        {"i2t_R@1": 0.25, "i2t_R@5": 0.5, "i2t_R@10": 0.75, "rsum": 1.5}
    )


@pytest.mark.parametrize(
    ("scores", "text_to_image", "message"),
    [
        (np.zeros((0, 0)), np.zeros(0, dtype=int), "empty gallery"),
        (np.zeros((2, 3)), np.array([0, 1]), "shape"),
        (np.zeros((2, 2)), np.array([0, 2]), "point outside"),
        (np.zeros((3, 2)), np.array([0, 1]), "1 of 3 images have no correct text"),
        (np.array([[0.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integer"),
    ],
)
def test_bad_input_raises(scores, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(scores, text_to_image)


def test_bad_ks_and_rerank_inputs_raise():
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(np.eye(2), np.array([0, 1]), ks=(0,))
    with pytest.raises(ValueError, match="no image has a correct caption"):
        rerank_recall(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty gallery"):
        rerank_recall(np.zeros((0, 3)), np.zeros((0, 3)))
