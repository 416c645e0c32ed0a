"""CIDEr-D (mengzi_ray.evaluation.cider_d) against hand-computed values and pycocoevalcap's corpus-mode scorer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from mengzi_ray.evaluation.cider_d import CiderD

# Image 1 holds the only "a" n-grams; every n-gram built from b, c, d and runs of z occurs in both images, so
# its idf is log(2) - log(2) = 0 and appending z's to a candidate changes its length but not its tf-idf vector.
PENALTY_CORPUS = {
    "img1": ["a b c d", "b c d z z z z"],
    "img2": ["b c d z z z z", "e f g h"],
}


def test_candidate_equal_to_reference_scores_ten() -> None:
    # Two images with disjoint n-grams: every df is 1, idf = log 2 > 0, cosine 1 for n = 1..4, no length gap,
    # so the score is 10 * mean(1, 1, 1, 1) * exp(0) = 10.
    cider = CiderD.from_references({"img1": ["a b c d"], "img2": ["e f g h"]})
    scores = cider.score(["a b c d"], [["a b c d"]])
    assert scores.dtype == np.float64 and scores.shape == (1,)
    assert scores[0] == pytest.approx(10.0, abs=1e-9)


@pytest.mark.parametrize("extra_tokens", [1, 3])
def test_length_penalty_is_gaussian_in_token_difference(extra_tokens: int) -> None:
    # "a b c d" + k z's has the same non-zero tf-idf entries as "a b c d" (see PENALTY_CORPUS), so all cosines
    # stay 1 and only the penalty exp(-k^2 / (2 * 6^2)) = exp(-k^2 / 72) changes.
    cider = CiderD.from_references(PENALTY_CORPUS)
    candidate = "a b c d" + " z" * extra_tokens
    same, longer = cider.score(["a b c d", candidate], [["a b c d"], ["a b c d"]])
    assert same == pytest.approx(10.0, abs=1e-9)
    assert longer / same == pytest.approx(math.exp(-(extra_tokens**2) / 72.0), rel=1e-12)


def test_clipping_repeated_word_does_not_raise_score() -> None:
    # Candidate "a a b c d" vs reference "a b c d"; with L = log 2 every weight is 0 or L (unseen n-grams such as
    # "a a" have df 0 -> idf log 2; b/c/d n-grams have idf 0):
    #   unigrams: cand a=2L, ref a=L -> min(2L, L) * L / (2L * L)       = 1/2  (unclipped would be 1)
    #   bigrams:  cand {a a, a b}=L each, ref {a b}=L -> L*L / (sqrt2 L * L) = 1/sqrt2; same for 3- and 4-grams.
    #   length 5 vs 4 -> penalty exp(-1/72).
    cider = CiderD.from_references(PENALTY_CORPUS)
    repeated, appended = cider.score(["a a b c d", "a b c d z"], [["a b c d"], ["a b c d"]])
    expected = 10.0 * (0.5 + 3 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert repeated == pytest.approx(expected, rel=1e-12)
    # Same length, hence same penalty, as the non-repeating candidate, and strictly lower.
    assert repeated < appended == pytest.approx(10.0 * math.exp(-1 / 72), rel=1e-12)


def test_score_averages_over_references() -> None:
    cider = CiderD.from_references({"img1": ["a b c d"], "img2": ["e f g h"]})
    # Against "e f g h" nothing matches (0); against "a b c d" the score is 10; the mean of the two is 5.
    assert cider.score(["a b c d"], [["a b c d", "e f g h"]])[0] == pytest.approx(5.0, abs=1e-9)
    assert cider.corpus_score(["a b c d", "e f g h"], [["a b c d"], ["a b c d"]]) == pytest.approx(5.0)


def test_matches_pycocoevalcap_corpus_mode() -> None:
    # pycocoevalcap's CIDEr counts df over the evaluated references and measures length in bigrams; with the same
    # df table our token-length version must agree on every image, including a 1-token and an empty candidate.
    refs = {
        "1": ["两 个 男 人 在 街 上 走 路", "两 个 人 走 在 街 道 上"],
        "2": ["一 只 猫 趴 在 沙 发 上", "一 只 小 猫 在 睡 觉"],
        "3": ["一 辆 红 色 的 车 停 在 路 边", "路 边 停 着 一 辆 车"],
        "4": ["一 个 男 人 在 打 篮 球", "男 人 在 球 场 上 打 球"],
    }
    cands = {"1": "两 个 人 在 街 上 走", "2": "一 只 猫 猫 猫 在 沙 发 上", "3": "车", "4": ""}
    theirs_mean, theirs = Cider().compute_score(
        {k: list(v) for k, v in refs.items()}, {k: [c] for k, c in cands.items()}
    )
    ours = CiderD.from_references(refs).score([cands[k] for k in refs], [refs[k] for k in refs])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours.mean() == pytest.approx(theirs_mean)
    assert ours[3] == 0.0


def test_dict_round_trip_through_json() -> None:
    cider = CiderD.from_references(PENALTY_CORPUS)
    restored = CiderD.from_dict(json.loads(json.dumps(cider.to_dict())))
    assert restored.document_frequency == cider.document_frequency
    assert (restored.num_docs, restored.n, restored.sigma) == (2, 4, 6.0)
    cands, refs = ["a a b c d", "e f z"], [["a b c d"], ["e f g h", "b c d z"]]
    np.testing.assert_array_equal(restored.score(cands, refs), cider.score(cands, refs))


def test_from_dict_rejects_foreign_tables() -> None:
    with pytest.raises(ValueError, match="not a mengzi_ray.cider_d v1 table"):
        CiderD.from_dict({"document_frequency": {}, "ref_len": 1.0})


def test_bad_input_is_loud() -> None:
    cider = CiderD.from_references(PENALTY_CORPUS)
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        cider.score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="references of candidate 0 are empty"):
        cider.score(["a"], [[]])
    with pytest.raises(TypeError, match="not one string"):
        cider.score(["a"], ["a b c"])
    with pytest.raises(ValueError, match="at least one candidate"):
        cider.corpus_score([], [])
    with pytest.raises(ValueError, match="empty reference corpus"):
        CiderD.from_references({})
    with pytest.raises(ValueError, match="references of image 'x' are empty"):
        CiderD.from_references({"x": []})
    with pytest.raises(ValueError, match="outside 1..2"):
        CiderD({("a",): 3}, num_docs=2)
