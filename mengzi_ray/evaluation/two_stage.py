"""The first stages' own retrieval metrics and their two-stage metrics (first-stage shortlist, cross-encoder
re-rank) in Oscar's cross-image protocol, computed from the full cross-encoder score grid the evaluate job already
has, so the two-stage figures cost no extra cross-encoder passes. Two first stages, as Serve has them: the model's
dual encoder (when its dir has one) and character n-gram TF-IDF (index/ngram.py, every model).

Two-stage ranking of a text query (t2i): the `candidates` images its first-stage scores rank highest are ordered by
the cross-encoder; every other image ranks below all of them (in first-stage order). An image query (i2t) is the
same over texts. With candidates >= the gallery this is exactly the cross-encoder's own ranking. Called by the
evaluate job (evaluation/jobs.py) and bench/bench_retrieval_stages.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mengzi_ray.evaluation.retrieval_eval import Gallery
from mengzi_ray.evaluation.retrieval_metrics import recall_from_ranks, retrieval_ranks
from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.index.ngram import NgramIndex
from mengzi_ray.index.store import inner_products, top_k


def dual_scores(embedder: DualEmbedder, gallery: Gallery) -> np.ndarray:
    """(num_images, num_texts) inner products of the gallery's image and text embeddings."""
    images = embedder.embed_images(list(zip(gallery.od_labels, gallery.regions)))
    return inner_products(images, embedder.embed_texts(gallery.texts))


def tfidf_scores(gallery: Gallery) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF grids (num_images, num_texts) per direction, as Serve's TF-IDF stage ranks: (t2i: each text against
    an index of the images' od-label strings, i2t: each image's od-label string against an index of the texts)."""
    t2i = NgramIndex(gallery.od_labels).scores(gallery.texts).T
    i2t = NgramIndex(gallery.texts).scores(gallery.od_labels)
    return t2i, i2t


def _shortlisted(first: np.ndarray, candidates: int) -> np.ndarray:
    """Bool mask (rows, cols): the `candidates` best columns of each row of `first`."""
    hits, _ = top_k(first, candidates)
    mask = np.zeros(first.shape, dtype=bool)
    np.put_along_axis(mask, hits, True, axis=1)
    return mask


def two_stage_recall(
    cross: np.ndarray, first: np.ndarray, text_to_image: np.ndarray, candidates: int, ks: Sequence[int],
    first_i2t: np.ndarray | None = None,
) -> dict[str, float]:
    """i2t/t2i R@K (and rsum) of first-stage shortlists of `candidates` re-ranked by `cross`; all (N, T) grids.
    `first` ranks both directions unless `first_i2t` gives the image queries' own first-stage grid."""
    first_i2t = first if first_i2t is None else first_i2t
    for grid in (first, first_i2t):
        if cross.shape != grid.shape:
            raise ValueError(f"cross-encoder scores {cross.shape} and first-stage scores {grid.shape} differ in shape")
    t2i_short = _shortlisted(first.T, candidates).T
    i2t_short = _shortlisted(first_i2t, candidates)
    _, t2i = retrieval_ranks(_above(cross, first, t2i_short), text_to_image)
    i2t, _ = retrieval_ranks(_above(cross, first_i2t, i2t_short), text_to_image)
    return recall_from_ranks(i2t, t2i, ks)


def _above(cross: np.ndarray, first: np.ndarray, shortlisted: np.ndarray) -> np.ndarray:
    """Cross-encoder scores where shortlisted, first-stage scores elsewhere, every shortlisted item above the rest."""
    offset = float(np.abs(cross).max() + np.abs(first).max() + 1.0)
    # float64: float32 scores + offset would round distinct scores together and reorder ties
    return np.where(shortlisted, cross.astype(np.float64) + offset, first.astype(np.float64) - offset)


def first_stage_report(
    first: np.ndarray, first_i2t: np.ndarray, cross: np.ndarray, text_to_image: np.ndarray,
    candidate_counts: Sequence[int], ks: Sequence[int],
) -> dict[str, object]:
    """{"metrics": the first stage's own R@K, "two_stage": {candidates: R@K}}; grids as in `two_stage_recall`."""
    i2t, _ = retrieval_ranks(first_i2t, text_to_image)
    _, t2i = retrieval_ranks(first, text_to_image)
    return {
        "metrics": recall_from_ranks(i2t, t2i, ks),
        "two_stage": {str(c): two_stage_recall(cross, first, text_to_image, c, ks, first_i2t) for c in candidate_counts},
    }


def dual_encoder_report(
    model_dir: str, gallery: Gallery, cross: np.ndarray, candidate_counts: Sequence[int], ks: Sequence[int],
    batch_size: int = 64,
) -> dict[str, object]:
    """`first_stage_report` of the dual encoder of a model dir that has one."""
    first = dual_scores(DualEmbedder(model_dir, batch_size=batch_size), gallery)
    return first_stage_report(first, first, cross, gallery.text_to_image, candidate_counts, ks)


def tfidf_report(gallery: Gallery, cross: np.ndarray, candidate_counts: Sequence[int], ks: Sequence[int]) -> dict[str, object]:
    """`first_stage_report` of the TF-IDF stage (any model)."""
    t2i, i2t = tfidf_scores(gallery)
    return first_stage_report(t2i, i2t, cross, gallery.text_to_image, candidate_counts, ks)
