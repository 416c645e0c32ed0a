"""The dual encoder's own retrieval metrics and the two-stage metrics (dual-encoder shortlist, cross-encoder
re-rank) in Oscar's cross-image protocol, computed from the full cross-encoder score grid the evaluate job already
has, so the two-stage figures cost no extra cross-encoder passes.

Two-stage ranking of a text query (t2i): the `candidates` images its first-stage scores rank highest are ordered by
the cross-encoder; every other image ranks below all of them (in first-stage order). An image query (i2t) is the
same over texts. With candidates >= the gallery this is exactly the cross-encoder's own ranking. Called by the
evaluate job (evaluation/jobs.py) and bench/bench_retrieval_stages.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mengzi_ray.evaluation.retrieval_eval import Gallery
from mengzi_ray.evaluation.retrieval_metrics import recall_from_ranks, retrieval_ranks, retrieval_recall
from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.index.store import top_k


def dual_scores(embedder: DualEmbedder, gallery: Gallery) -> np.ndarray:
    """(num_images, num_texts) inner products of the gallery's image and text embeddings."""
    images = embedder.embed_images(list(zip(gallery.od_labels, gallery.regions)))
    return images @ embedder.embed_texts(gallery.texts).T


def _shortlisted(first: np.ndarray, candidates: int) -> np.ndarray:
    """Bool mask (rows, cols): the `candidates` best columns of each row of `first`."""
    hits, _ = top_k(first, candidates)
    mask = np.zeros(first.shape, dtype=bool)
    np.put_along_axis(mask, hits, True, axis=1)
    return mask


def two_stage_recall(
    cross: np.ndarray, first: np.ndarray, text_to_image: np.ndarray, candidates: int, ks: Sequence[int]
) -> dict[str, float]:
    """i2t/t2i R@K (and rsum) of first-stage shortlists of `candidates` re-ranked by `cross`; both (N, T) grids."""
    if cross.shape != first.shape:
        raise ValueError(f"cross-encoder scores {cross.shape} and first-stage scores {first.shape} differ in shape")
    offset = float(np.abs(cross).max() + np.abs(first).max() + 1.0)  # every shortlisted item above every other
    t2i_short = _shortlisted(first.T, candidates).T
    i2t_short = _shortlisted(first, candidates)
    _, t2i = retrieval_ranks(np.where(t2i_short, cross + offset, first - offset), text_to_image)
    i2t, _ = retrieval_ranks(np.where(i2t_short, cross + offset, first - offset), text_to_image)
    return recall_from_ranks(i2t, t2i, ks)


def dual_encoder_report(
    model_dir: str, gallery: Gallery, cross: np.ndarray, candidate_counts: Sequence[int], ks: Sequence[int],
    batch_size: int = 64,
) -> dict[str, object]:
    """{"metrics": the dual encoder's own R@K, "two_stage": {candidates: R@K}} for a model dir with a dual encoder."""
    first = dual_scores(DualEmbedder(model_dir, batch_size=batch_size), gallery)
    return {
        "metrics": retrieval_recall(first, gallery.text_to_image, ks),
        "two_stage": {str(c): two_stage_recall(cross, first, gallery.text_to_image, c, ks) for c in candidate_counts},
    }
