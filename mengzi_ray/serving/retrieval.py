"""Two-stage retrieval over a gallery: a cheap candidate stage, then cross-encoder re-ranking.

The Oscar retrieval model is a cross-encoder (caption ‖ tags ‖ regions → match probability), so scoring a whole
gallery per query costs one forward pass per image. The candidate stage is the model's dual encoder
(serving/dual_stage.py) when its dir has one, else a character n-gram TF-IDF index (index/ngram.py): text →
images against each image's Chinese tag string, image → captions the image's tag string against each caption.
Only the top `candidates` go to the cross-encoder. What this costs in recall against brute force is measured by
bench/bench_serve.py and bench/bench_retrieval_stages.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.index.ngram import NgramIndex
from mengzi_ray.index.card import SearchSection
from mengzi_ray.inference import MatchScorer, Pair
from mengzi_ray.serving.captioning import RegionSet
from mengzi_ray.serving.dual_stage import DualStage
from mengzi_ray.serving.gallery import Gallery
from mengzi_ray.text import tag_string


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
    `index_uri`: the index job's output holding the gallery images' vectors (else they are embedded at load).
    `search`: how the dual-encoder stage searches its vectors (exact by default; index/search.py)."""

    def __init__(self, encoder: MatchScorer, gallery: Gallery, candidates: int | None, first_stage: str = "auto",
                 index_uri: str | None = None, search: SearchSection | None = None):
        self.encoder = encoder
        self.candidates = candidates
        self.search_section = search
        dual = encoder.model.has_dual_encoder
        if first_stage == "dual_encoder" and not dual:
            raise ValueError(f"{encoder.model.source_dir}: first_stage dual_encoder, but the model dir has no dual encoder")
        if first_stage not in ("auto", "tfidf", "dual_encoder"):
            raise ValueError(f"first_stage must be auto, tfidf or dual_encoder, got {first_stage!r}")
        self.first_stage = "dual_encoder" if dual and first_stage != "tfidf" else "tfidf"
        self.embedder = DualEmbedder(encoder.model.source_dir, model=encoder.model) if self.first_stage == "dual_encoder" else None
        self.set_gallery(gallery, index_uri)

    def set_gallery(self, gallery: Gallery, index_uri: str | None = None) -> None:
        """Build every index of `gallery`, then swap them in together: a search running in another thread meanwhile
        sees the old gallery whole (an IVF stage trains for seconds)."""
        image_index = NgramIndex([tag_string(r.tags) for r in gallery.regions])
        caption_index = NgramIndex(gallery.captions) if gallery.captions else None
        dual = DualStage(self.embedder, gallery, index_uri, self.search_section) if self.embedder is not None else None
        self.gallery, self.image_index, self.caption_index, self.dual = gallery, image_index, caption_index, dual

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
