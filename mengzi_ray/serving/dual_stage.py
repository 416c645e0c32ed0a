"""The dual-encoder candidate stage of two-stage search (modeling/dual_encoder.py, index/).

Gallery images are vectors from the index job's output (`gallery.index`) when the section names one, else embedded
in-process when the gallery is loaded; gallery captions are embedded at load. A text query costs one text-side
pass and an inner-product search over the gallery images (exact by default, FAISS IVF-Flat by the retriever's
`search` section: index/search.py), an image query one image-side pass and a search over the captions; only the
top `candidates` go to the cross-encoder. Used by `RetrievalEngine` for models whose dir carries a dual encoder;
the TF-IDF stage stays for models without one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.index.card import SearchSection
from mengzi_ray.index.search import build_search
from mengzi_ray.index.store import EmbeddingIndex
from mengzi_ray.serving.captioning import RegionSet
from mengzi_ray.serving.gallery import Gallery
from mengzi_ray.text import tag_string

log = logging.getLogger(__name__)


class DualStage:
    """Embeddings of one gallery and shortlists by inner product (`search`: exact unless it says ivf)."""

    def __init__(self, embedder: DualEmbedder, gallery: Gallery, index_uri: str | None = None,
                 search: SearchSection | None = None):
        self.embedder = embedder
        tag_map = embedder.model.config.tag_map
        if index_uri is not None:
            self.image_vectors = _vectors_from_index(index_uri, gallery)
        else:
            images = [(tag_string(r.tags_for(tag_map)), r.features) for r in gallery.regions]
            self.image_vectors = embedder.embed_images(images)
        self.caption_vectors = embedder.embed_texts(gallery.captions) if gallery.captions else None
        search = search or SearchSection()
        self.image_search = build_search(self.image_vectors, search)
        self.caption_search = build_search(self.caption_vectors, search) if self.caption_vectors is not None else None
        log.info("dual-encoder stage: %d image vectors (%s search), %d caption vectors (%s)", len(self.image_vectors),
                 self.image_search.describe(), len(gallery.captions),
                 self.caption_search.describe() if self.caption_search else "none")

    def images_for(self, texts: Sequence[str], k: int) -> list[np.ndarray]:
        """The k gallery images nearest each text, best first."""
        queries = self.embedder.embed_texts(texts, batch_size=len(texts))
        hits, _ = self.image_search.search(queries, k)
        return list(hits)

    def captions_for(self, regions: Sequence[RegionSet], k: int) -> list[np.ndarray]:
        """The k gallery captions nearest each image, best first (LookupError without a caption gallery)."""
        if self.caption_search is None:
            raise LookupError("the gallery has no captions (gallery.texts is not set)")
        tag_map = self.embedder.model.config.tag_map
        queries = self.embedder.embed_images([(tag_string(r.tags_for(tag_map)), r.features) for r in regions],
                                             batch_size=len(regions))
        hits, _ = self.caption_search.search(queries, k)
        return list(hits)


def _vectors_from_index(uri: str, gallery: Gallery) -> np.ndarray:
    """The index rows of the gallery's images, in gallery order; ValueError naming how many are missing."""
    index = EmbeddingIndex.load(uri)
    row_of = {image_id: n for n, image_id in enumerate(index.image_ids)}
    missing = [i for i in gallery.image_ids if i not in row_of]
    if missing:
        raise ValueError(f"{uri}: {len(missing)} of {len(gallery)} gallery images are not in the index, e.g. "
                         f"{missing[:3]}; run `mengzi-ray index` on the gallery's features")
    return index.vectors[[row_of[i] for i in gallery.image_ids]]
