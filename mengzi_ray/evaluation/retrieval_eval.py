"""Retrieval evaluation at scale: every (image, caption) pair scored by the match classifier on a Ray Data actor pool.

The pair space follows Oscar's ``--cross_image_eval`` (microsoft/Oscar `oscar/run_retrieval.py` `compute_ranks`): with
N images and T = N·k texts, pair ``p`` is image ``p // T`` with text ``p % T``, so the flat score vector reshapes to
(N, T). The re-rank mode scores listed (image, text) pairs instead (:class:`ListedPairs`).

Determinism: the pair range is cut into chunks of ``chunk_size`` pairs, a multiple of ``batch_size``; an actor
scores a chunk in ``batch_size`` slices aligned to the global pair index, so every pair sits in the same batch, at
the same row, whatever the number of actors or the chunk size — the scores, and hence the ranks, are bit-identical.

Called by the evaluate job (:mod:`mengzi_ray.evaluation.jobs`) and ``bench/bench_eval.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from mengzi_ray.inference import MatchScorer

log = logging.getLogger(__name__)


@dataclass
class Gallery:
    """N images (regions (n_i, 2054), tag string) and their T texts; ``text_to_image[j]`` = image index of text j.

    Texts are grouped by image in image order (k per image in the cross-image protocol)."""

    image_ids: list[str]
    regions: list[np.ndarray]
    od_labels: list[str]
    texts: list[str]
    text_to_image: np.ndarray

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.texts)


def build_gallery(
    image_ids: Sequence[str],
    references: dict[str, list[str]],
    regions: dict[str, tuple[np.ndarray, str, str]],
    captions_per_image: int,
) -> Gallery:
    """Gallery of ``image_ids`` with the first ``captions_per_image`` references of each.

    ``regions``: image_id → (regions, od-label string, source), as :func:`feature_io.load_regions` returns.
    Raises ValueError for an empty gallery, an image without features, or images with fewer than k captions
    (they would make the text set, and the i2t denominator, silently uneven).
    """
    if not image_ids:
        raise ValueError("empty gallery: no images to rank")
    no_features = [i for i in image_ids if i not in regions]
    if no_features:
        raise ValueError(f"{len(no_features)} gallery images have no features, e.g. {no_features[:5]}")
    short = [i for i in image_ids if len(references.get(i, ())) < captions_per_image]
    if short:
        raise ValueError(
            f"{len(short)} of {len(image_ids)} gallery images have fewer than {captions_per_image} captions, "
            f"e.g. {short[:5]}"
        )
    texts = [t for i in image_ids for t in references[i][:captions_per_image]]
    return Gallery(
        image_ids=list(image_ids),
        regions=[regions[i][0] for i in image_ids],
        od_labels=[regions[i][1] for i in image_ids],
        texts=texts,
        text_to_image=np.repeat(np.arange(len(image_ids)), captions_per_image),
    )


class PairIndex(Protocol):
    """Maps a global pair index range to (image indices, text indices)."""

    num_pairs: int

    def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class CrossPairs:
    """Every image with every text, image-major: pair p = (p // num_texts, p % num_texts)."""

    num_images: int
    num_texts: int

    @property
    def num_pairs(self) -> int:
        return self.num_images * self.num_texts

    def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(start, stop)
        return index // self.num_texts, index % self.num_texts


@dataclass(frozen=True)
class ListedPairs:
    """Explicit (image, text) index pairs, e.g. the re-rank candidate lists."""

    images: np.ndarray
    texts: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.images)

    def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[start:stop], self.texts[start:stop]


class PairScorer:
    """One model actor: match scores softmax(logits)[:, 1] for ranges of the pair index.

    The model and its whole input layout (text length, regions, od labels, attention mask type) come from the
    model dir through :class:`mengzi_ray.inference.MatchScorer`; ``config_overrides`` only for a dir that records
    no layout. Plain class: ``score_pairs`` runs it inside a ChunkScorer actor; tests use it directly.
    """

    def __init__(
        self, model_dir: str, gallery: Gallery, pairs: PairIndex, batch_size: int, use_gpu: bool,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.scorer = MatchScorer.from_model_dir(model_dir, "cuda" if use_gpu else "cpu",
                                                 config_overrides=config_overrides, batch_size=batch_size)
        self.gallery = gallery
        self.index = pairs
        self.batch_size = batch_size

    def score(self, start: int, stop: int) -> tuple[int, np.ndarray]:
        """Scores of pairs [start, stop) as float32; ``start`` must be a multiple of batch_size. Returns (start, scores)."""
        if start % self.batch_size:
            raise ValueError(f"chunk start {start} is not a multiple of batch_size {self.batch_size}")
        g = self.gallery
        images, texts = self.index.pairs(start, stop)
        return start, self.scorer.score([(g.texts[t], g.od_labels[i], g.regions[i]) for i, t in zip(images, texts)])


class ChunkScorer:
    """The Ray Data model actor of pair scoring: builds one ``scorer_cls`` (a PairScorer: the model is loaded once
    per actor) and scores the chunks of each batch, rows (start, stop) → rows (start, scores: list<float32>).
    ``gallery`` may be an ObjectRef (put once by the driver, fetched once per actor)."""

    def __init__(self, scorer_cls: type, gallery: Any, **scorer_kwargs: Any) -> None:
        import ray

        if isinstance(gallery, ray.ObjectRef):
            gallery = ray.get(gallery)
        self.scorer = scorer_cls(gallery=gallery, **scorer_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        done = [self.scorer.score(int(lo), int(hi)) for lo, hi in zip(batch["start"], batch["stop"])]
        return {"start": np.array([lo for lo, _ in done], np.int64), "scores": [scores for _, scores in done]}


def score_pairs(
    model_dir: str,
    gallery: Gallery,
    pairs: PairIndex,
    *,
    num_actors: int,
    chunk_size: int,
    batch_size: int,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    config_overrides: dict[str, Any] | None = None,
    scorer_cls: type = PairScorer,
) -> np.ndarray:
    """Score every pair of ``pairs`` on a Ray Data actor pool of ``num_actors`` ChunkScorers; returns (num_pairs,)
    float32 (Ray must be up). The dataset is the list of chunks [start, stop), one chunk per actor call.

    An actor that dies (a preempted node, an OOM kill) is restarted by Ray Data and its chunks retried (``score`` is
    a pure function of its range, so a retry cannot change a score). ``scorer_cls``: PairScorer or a subclass
    (tests inject failures).

    Raises ValueError when chunk_size is not a multiple of batch_size (that would make scores depend on chunking)
    or there are no pairs; RuntimeError when a pair comes back unscored.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if chunk_size % batch_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of batch_size {batch_size}")
    total = pairs.num_pairs
    if total == 0:
        raise ValueError("no pairs to score (empty gallery)")
    starts = range(0, total, chunk_size)
    # one block per chunk, so the pool hands chunks to whichever actor is free (a block goes to one actor)
    chunks = ray.data.from_items(
        [{"start": lo, "stop": min(lo + chunk_size, total)} for lo in starts], override_num_blocks=len(starts)
    )
    size = min(num_actors, len(starts))
    scored = chunks.map_batches(
        ChunkScorer,
        fn_constructor_kwargs={
            "scorer_cls": scorer_cls, "gallery": ray.put(gallery), "model_dir": model_dir, "pairs": pairs,
            "batch_size": batch_size, "use_gpu": num_gpus_per_actor > 0,
            "config_overrides": config_overrides,
        },
        compute=ActorPoolStrategy(min_size=size, max_size=size),
        batch_size=1,
        batch_format="numpy",
        # Setting both num_cpus and num_gpus is "experimental" in Ray Data: a GPU actor asks for GPUs only.
        **({"num_gpus": num_gpus_per_actor} if num_gpus_per_actor > 0 else {"num_cpus": num_cpus_per_actor}),
    )
    scores = np.full(total, np.nan, dtype=np.float32)
    done = 0
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        for start, chunk_scores in zip(batch["start"], batch["scores"]):
            scores[start : start + len(chunk_scores)] = chunk_scores
            done += len(chunk_scores)
        log.debug("scored %d / %d pairs", done, total)
    unscored = int(np.isnan(scores).sum())
    if unscored:
        raise RuntimeError(f"{unscored} of {total} pairs came back unscored")
    return scores


def rerank_pairs(
    gallery: Gallery, candidates: dict[str, list[tuple[str, int]]], captions_per_image: int
) -> tuple[ListedPairs, np.ndarray, list[str]]:
    """Candidate lists → (pairs, labels (Q, C) bool, query image ids), Q queries × C candidates each.

    ``candidates``: query image_id → list of (image_id, caption index) pairs (Oscar's top-20 file layout). Every
    query and candidate image must be in the gallery, every caption index < k and every list the same length;
    otherwise ValueError with counts.
    """
    if not candidates:
        raise ValueError("empty candidate file: no query images")
    position = {image_id: n for n, image_id in enumerate(gallery.image_ids)}
    lengths = {len(v) for v in candidates.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every query needs the same non-zero number of candidates, got lengths {sorted(lengths)}")
    unknown = sorted({q for q in candidates if q not in position} | {c for v in candidates.values() for c, _ in v if c not in position})
    if unknown:
        raise ValueError(f"{len(unknown)} candidate-file images are not in the gallery, e.g. {unknown[:5]}")
    bad_index = sum(1 for v in candidates.values() for _, j in v if not 0 <= int(j) < captions_per_image)
    if bad_index:
        raise ValueError(f"{bad_index} candidates have a caption index outside 0..{captions_per_image - 1}")
    queries = list(candidates)
    images = np.array([position[q] for q in queries for _ in candidates[q]], dtype=np.int64)
    texts = np.array([position[c] * captions_per_image + int(j) for q in queries for c, j in candidates[q]], dtype=np.int64)
    labels = (gallery.text_to_image[texts] == images).reshape(len(queries), -1)
    return ListedPairs(images, texts), labels, queries
