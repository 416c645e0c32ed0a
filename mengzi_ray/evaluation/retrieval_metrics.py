"""Retrieval ranks and Recall@K, exactly as Oscar's ``compute_ranks`` (microsoft/Oscar `oscar/run_retrieval.py`
`compute_ranks`).

Two evaluation modes:

* **Cross-image** (full ranking; :func:`retrieval_ranks`, :func:`retrieval_recall`): a score for every
  (image, text) pair. The i2t rank of an image is the 0-based position of its best-ranked correct text when all
  texts are sorted by descending score; the t2i rank of a text is the position of its (single) correct image when
  all images are sorted by descending score. R@K = fraction of ranks < K.
* **Re-rank** (:func:`rerank_recall`): each image has its own short candidate list (Oscar's top-20 minival
  file); only i2t R@K over those candidates.

Ties: Oscar sorts with ``np.argsort(sim)[::-1]``, i.e. ascending then reversed, so among equal scores the item
with the *higher* index comes first (numpy's default sort keeps equal items in index order for the small arrays
it sorts by insertion; for large arrays the original's tie order is unspecified). We fix that order for every
size: an item's position = #(strictly higher scores) + #(equal scores at a higher index). The result therefore
does not depend on how the scores were computed or chunked.

Bad input is an error, never a smaller denominator: an empty gallery, a text pointing at no image, an image with
no correct text (its i2t rank would be undefined) or a non-finite score all raise ValueError.

Callers: the evaluate job (:mod:`mengzi_ray.evaluation.retrieval_eval`) and the retrieval fine-tune validation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def retrieval_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-image ranks.

    Args:
        scores: (num_images, num_texts) float match scores (higher = better match).
        text_to_image: (num_texts,) int, index of the image text ``j`` describes.

    Returns:
        ``(i2t_ranks, t2i_ranks)``: int64 arrays of shape (num_images,) and (num_texts,), 0-based, tie order as
        in the module docstring.

    Raises ValueError on an empty gallery or text set, shape mismatch, out-of-range image index, an image
    without any text, or a NaN/inf score.
    """
    scores, text_to_image = _check_cross_inputs(scores, text_to_image)
    num_images, num_texts = scores.shape
    text_index = np.arange(num_texts)

    # t2i: position of the correct image in the column sorted by descending score.
    correct = scores[text_to_image, text_index]  # (num_texts,)
    higher = (scores > correct).sum(axis=0)
    later_ties = ((scores == correct) & (np.arange(num_images)[:, None] > text_to_image)).sum(axis=0)
    t2i_ranks = (higher + later_ties).astype(np.int64)

    # i2t: for each image, best (lowest) position among its correct texts.
    order = np.argsort(text_to_image, kind="stable")
    counts = np.bincount(text_to_image, minlength=num_images)
    i2t_ranks = np.empty(num_images, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for image in range(num_images):
        texts = order[starts[image] : starts[image] + counts[image]]
        i2t_ranks[image] = _best_position(scores[image], texts)
    return i2t_ranks, t2i_ranks


def retrieval_recall(
    scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Cross-image Recall@K (interface 2 of the project brief).

    ``scores`` (num_images, num_texts) match scores; ``text_to_image[j]`` the image index of text ``j``.
    Returns ``i2t_R@K`` and ``t2i_R@K`` for every K in ``ks`` (fractions in [0, 1]) and ``rsum``, the sum of
    all of them (a fraction sum, so at most ``2 * len(ks)``). Raises ValueError as :func:`retrieval_ranks` and
    for an empty or non-positive ``ks``.
    """
    ks = _check_ks(ks)
    i2t_ranks, t2i_ranks = retrieval_ranks(scores, text_to_image)
    return recall_from_ranks(i2t_ranks, t2i_ranks, ks)


def recall_from_ranks(
    i2t_ranks: np.ndarray, t2i_ranks: np.ndarray | None, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """R@K dict from rank arrays (``t2i_ranks`` None in re-rank mode, then only i2t keys and their rsum)."""
    ks = _check_ks(ks)
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        if ranks is None:
            continue
        ranks = np.asarray(ranks)
        if ranks.size == 0:
            raise ValueError(f"no {direction} ranks to average (empty gallery)")
        for k in ks:
            out[f"{direction}_R@{k}"] = float(np.mean(ranks < k))
    out["rsum"] = float(sum(out.values()))
    return out


def rerank_recall(
    scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Re-rank mode: i2t R@K over per-image candidate lists.

    Args:
        scores: (num_images, num_candidates) scores of each image's own candidates.
        labels: same shape, truthy where the candidate is a correct caption of that image.

    Returns ``i2t_R@K`` for K in ``ks`` and ``rsum``. An image whose candidates hold no correct caption counts as
    a miss at every K (rank = num_candidates, as Oscar's loop leaves it), never dropped; raises ValueError when
    *no* image has a correct candidate, shapes differ, the input is empty or a score is not finite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same 2-D shape")
    if scores.size == 0:
        raise ValueError("empty gallery: no images or no candidates to rank")
    _check_finite(scores)
    if not labels.any():
        raise ValueError("no image has a correct caption among its candidates; check the candidate file")
    ranks = np.full(scores.shape[0], scores.shape[1], dtype=np.int64)
    for image in range(scores.shape[0]):
        correct = np.flatnonzero(labels[image])
        if correct.size:
            ranks[image] = _best_position(scores[image], correct)
    return recall_from_ranks(ranks, None, ks)


def _best_position(row: np.ndarray, correct: np.ndarray) -> int:
    """Lowest descending-order position in ``row`` among the indices ``correct`` (ties: higher index first)."""
    values = row[correct][:, None]  # (c, 1)
    index = np.arange(row.shape[0])
    positions = (row > values).sum(axis=1) + ((row == values) & (index > correct[:, None])).sum(axis=1)
    return int(positions.min())


def _check_cross_inputs(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    text_to_image = np.asarray(text_to_image)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (num_images, num_texts), got shape {scores.shape}")
    num_images, num_texts = scores.shape
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"empty gallery: {num_images} images × {num_texts} texts")
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {text_to_image.shape}")
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    bad = (text_to_image < 0) | (text_to_image >= num_images)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} texts point outside the {num_images} images, e.g. text {int(np.flatnonzero(bad)[0])}"
        )
    orphans = np.flatnonzero(np.bincount(text_to_image, minlength=num_images) == 0)
    if orphans.size:
        raise ValueError(
            f"{orphans.size} of {num_images} images have no correct text (i2t rank undefined), "
            f"e.g. image index {orphans[:5].tolist()}"
        )
    _check_finite(scores)
    return scores, text_to_image.astype(np.int64)


def _check_finite(scores: np.ndarray) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} scores are NaN or infinite")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
    return ks
