"""Two-stage retrieval over a gallery: a cheap candidate stage, then cross-encoder re-ranking.

The Oscar retrieval model is a cross-encoder (caption ‖ tags ‖ regions → match probability), so scoring a whole
gallery per query costs one forward pass per image. The candidate stage is a character n-gram TF-IDF index:
- text → images: the query against each image's Chinese tag string;
- image → captions: the image's tag string against each caption.
Both sides are plain Chinese text after the one normaliser, the tag vocabulary is the model's own input, and
the index is a sparse matrix product (milliseconds for 10^4 images). Only the top `candidates` go to the
cross-encoder. What this costs in recall against brute force is measured by bench/bench_serve.py.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.inference import MatchScorer, Pair
from mengzi_ray.serving.captioning import RegionSet
from mengzi_ray.serving.dual_stage import DualStage
from mengzi_ray.serving.gallery import Gallery
from mengzi_ray.text import normalize_text, tag_string

_NOT_WORD = re.compile(r"[^\w]+")


def char_ngrams(text: str) -> list[str]:
    """Character unigrams and bigrams of the normalised text (punctuation and spaces are boundaries)."""
    grams: list[str] = []
    for piece in _NOT_WORD.split(normalize_text(text).lower()):
        grams.extend(piece)
        grams.extend(piece[i : i + 2] for i in range(len(piece) - 1))
    return grams


class NgramIndex:
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised rows) over character n-grams of a list of documents."""

    def __init__(self, documents: Sequence[str]):
        counts = [Counter(char_ngrams(doc)) for doc in documents]
        self.vocabulary: dict[str, int] = {}
        for counter in counts:
            for gram in counter:
                self.vocabulary.setdefault(gram, len(self.vocabulary))
        df = np.zeros(len(self.vocabulary), dtype=np.float64)
        rows, cols, vals = [], [], []
        for row, counter in enumerate(counts):
            for gram, count in counter.items():
                col = self.vocabulary[gram]
                df[col] += 1
                rows.append(row)
                cols.append(col)
                vals.append(1.0 + math.log(count))
        self.idf = np.log((1 + len(documents)) / (1 + df)) + 1.0
        matrix = sp.csr_matrix((vals, (rows, cols)), shape=(len(documents), len(self.vocabulary)), dtype=np.float64)
        self.matrix = _l2_rows(matrix.multiply(self.idf[None, :]).tocsr())

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def query(self, text: str, k: int) -> np.ndarray:
        """Indices of the k best documents, best first (ties keep document order)."""
        vector = np.zeros(len(self.vocabulary), dtype=np.float64)
        for gram, count in Counter(char_ngrams(text)).items():
            col = self.vocabulary.get(gram)
            if col is not None:
                vector[col] = (1.0 + math.log(count)) * self.idf[col]
        scores = self.matrix @ vector
        k = min(k, len(scores))
        order = np.argsort(-scores, kind="stable")
        return order[:k]


def _l2_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.diags(1.0 / norms) @ matrix


@dataclass
class Hit:
    index: int  # into gallery images (image search) or gallery captions (caption search)
    score: float  # cross-encoder match probability


@dataclass
class SearchQuery:
    """An image search (text set) or a caption search (regions set); k results wanted."""

    k: int
    text: str | None = None
    regions: RegionSet | None = None


class RetrievalEngine:
    """A gallery with its candidate indices and the cross-encoder (the model dir's `MatchScorer`, layout and tag
    map as evaluation). `candidates=None` means brute force.

    first_stage: "auto" shortlists with the dual encoder when the model dir has one (serving/dual_stage.py), else
    with TF-IDF; "tfidf" / "dual_encoder" force one (the latter a ValueError for a model without it).
    `index_uri`: the index job's output holding the gallery images' vectors (else they are embedded at load)."""

    def __init__(self, encoder: MatchScorer, gallery: Gallery, candidates: int | None, first_stage: str = "auto",
                 index_uri: str | None = None):
        self.encoder = encoder
        self.candidates = candidates
        dual = encoder.model.has_dual_encoder
        if first_stage == "dual_encoder" and not dual:
            raise ValueError(f"{encoder.model.source_dir}: first_stage dual_encoder, but the model dir has no dual encoder")
        if first_stage not in ("auto", "tfidf", "dual_encoder"):
            raise ValueError(f"first_stage must be auto, tfidf or dual_encoder, got {first_stage!r}")
        self.first_stage = "dual_encoder" if dual and first_stage != "tfidf" else "tfidf"
        self.embedder = DualEmbedder(encoder.model.source_dir, model=encoder.model) if self.first_stage == "dual_encoder" else None
        self.set_gallery(gallery, index_uri)

    def set_gallery(self, gallery: Gallery, index_uri: str | None = None) -> None:
        self.gallery = gallery
        self.image_index = NgramIndex([tag_string(r.tags) for r in gallery.regions])
        self.caption_index = NgramIndex(gallery.captions) if gallery.captions else None
        self.dual = DualStage(self.embedder, gallery, index_uri) if self.embedder is not None else None

    def _shortlist(self, query: SearchQuery) -> np.ndarray:
        if self.dual is not None and self.candidates is not None:
            return self._dual_shortlist(query)
        if query.text is not None:
            size = len(self.gallery)
            index, probe = self.image_index, query.text
        else:
            if self.caption_index is None:
                raise LookupError("the gallery has no captions (gallery.texts is not set)")
            assert query.regions is not None
            size = len(self.gallery.captions)
            index, probe = self.caption_index, self.encoder.od_labels(query.regions.labels, query.regions.tags)
        wanted = None if self.candidates is None else max(self.candidates, query.k)
        if wanted is None or wanted >= size:
            return np.arange(size)
        return index.query(probe, wanted)

    def _image(self, regions: RegionSet) -> tuple[str, np.ndarray]:
        """(od-label string in the model's tag map, region vectors) of one image."""
        return self.encoder.od_labels(regions.labels, regions.tags), regions.features

    def _dual_shortlist(self, query: SearchQuery) -> np.ndarray:
        assert self.dual is not None and self.candidates is not None
        wanted = max(self.candidates, query.k)
        if query.text is not None:
            return self.dual.images_for([query.text], wanted)[0]
        assert query.regions is not None
        return self.dual.captions_for([query.regions], wanted)[0]

    def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        """Top-k hits per query, best first; all queries' candidate pairs go through one scoring pass."""
        shortlists = [self._shortlist(q) for q in queries]
        pairs: list[Pair] = []
        for query, shortlist in zip(queries, shortlists):
            if query.text is not None:
                pairs.extend(Pair(query.text, *self._image(self.gallery.regions[i])) for i in shortlist)
            else:
                assert query.regions is not None
                image = self._image(query.regions)
                pairs.extend(Pair(self.gallery.captions[i], *image) for i in shortlist)
        scores = self.encoder.score(pairs)
        results, offset = [], 0
        for query, shortlist in zip(queries, shortlists):
            mine = scores[offset : offset + len(shortlist)]
            offset += len(shortlist)
            order = np.argsort(-mine, kind="stable")[: query.k]
            results.append([Hit(int(shortlist[j]), float(mine[j])) for j in order])
        return results
