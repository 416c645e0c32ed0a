"""Two-stage R@K from the cross-encoder grid and a first-stage grid: a full shortlist is the cross-encoder's own
ranking, a shortlist that misses the right item misses it, and re-ranking orders the shortlist by the cross-encoder."""

from __future__ import annotations

import numpy as np
import pytest

from mengzi_ray.evaluation.retrieval_metrics import retrieval_recall
from mengzi_ray.evaluation.two_stage import two_stage_recall


def test_a_shortlist_of_everything_is_the_cross_encoder_ranking() -> None:
    rng = np.random.default_rng(0)
    cross, first = rng.random((6, 12)), rng.standard_normal((6, 12))
    text_to_image = np.repeat(np.arange(6), 2)
    assert two_stage_recall(cross, first, text_to_image, 12, (1, 5)) == retrieval_recall(cross, text_to_image, (1, 5))


def test_the_shortlist_bounds_and_the_cross_encoder_orders() -> None:
    text_to_image = np.arange(3)
    cross = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.2, 0.6]])  # image × text
    # first stage: text 0 shortlists images {1, 2} (misses 0); texts 1, 2 shortlist their own image among two
    first = np.array([[0.0, 0.5, 0.1], [0.9, 0.9, 0.0], [0.8, 0.0, 0.9]])
    got = two_stage_recall(cross, first, text_to_image, 2, (1, 2, 3))
    # t2i: text 0's image is outside its shortlist → ranks after both shortlisted (rank 2); text 1: images {0, 1}
    # re-ranked by cross (0.1 vs 0.7) → rank 0; text 2: images {0, 2} → 0.6 beats 0.2 → rank 0
    assert (got["t2i_R@1"], got["t2i_R@2"], got["t2i_R@3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    # i2t: image 0 shortlists texts {1, 2} by first (0.5, 0.1), misses text 0; image 1 {0, 1}: cross 0.8 > 0.7 → rank 1;
    # image 2 {0, 2}: cross 0.6 > 0.1 → rank 0
    assert (got["i2t_R@1"], got["i2t_R@2"], got["i2t_R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    with pytest.raises(ValueError, match="differ in shape"):
        two_stage_recall(cross, first[:2], text_to_image, 2, (1,))
