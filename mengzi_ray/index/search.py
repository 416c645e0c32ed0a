"""Top-k inner-product search over a fixed set of unit vectors: exact (the default) or FAISS IVF-Flat (opt-in).

Serve's dual-encoder candidate stage (serving/dual_stage.py) builds one searcher per gallery side when the gallery
loads. Exact search is a matrix product (index/store.py); it costs about 2 ms a query at 100,000 vectors of 64
dims and 16 ms at 256 dims on 2 cores. IVF-Flat (FAISS's `IndexIVFFlat`) clusters the vectors into `lists` cells
with k-means and scans only the `probes` cells nearest the query: 0.14–0.15 ms at 100,000 vectors with recall@10
0.999–1.000 at 8 probes (bench/bench_index_search.py). FAISS is an optional dependency
(`pip install 'mengzi-ray[ann]'`, which installs faiss-cpu); it is imported only when an IVF search is built.

The IVF cells are trained when the searcher is built, not stored with the index, so the index on disk stays plain
Parquet (readable by pyarrow, pandas or DuckDB) and valid for any `lists`; training takes about 4 s at 100,000
vectors of 256 dims. FAISS's k-means has a fixed seed, so the same vectors give the same cells.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import Field

from mengzi_ray.config import Section
from mengzi_ray.index.store import inner_products, top_k

# FAISS warns below 39 training vectors per cell; fewer cells than that are trained on too little data to be useful
MIN_VECTORS_PER_LIST = 39


class VectorSearch(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows per query (Q, dim): (indices (Q, k'), scores (Q, k')) best first, k' = min(k, n)."""
        ...


class ExactSearch:
    """Every vector scored by one matrix product; ties ordered by row."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k(inner_products(queries, self.vectors), k)


def import_faiss():
    """The faiss module, or ImportError that says which package to install."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("search method 'ivf' needs FAISS: pip install 'mengzi-ray[ann]' (or pip install faiss-cpu)"
                          ) from err
    return faiss


class IvfSearch:
    """FAISS IVF-Flat over (n, dim) float32 vectors by inner product.

    lists: k-means cells (None: 4·√n, the FAISS guideline), at most n / 39 so that every cell has training data.
    probes: cells scanned per query; more is slower and closer to exact. A query whose probed cells hold fewer
    than k vectors is answered by exact search, so a search never returns fewer than min(k, n) rows."""

    def __init__(self, vectors: np.ndarray, lists: int | None = None, probes: int = 8):
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"an IVF search needs a non-empty (n, dim) matrix, got shape {vectors.shape}")
        faiss = import_faiss()
        # FAISS's OpenMP team the size of torch's: the cross-encoder re-rank that follows must not lose its cores
        faiss.omp_set_num_threads(torch.get_num_threads())
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = self.vectors.shape
        wanted = lists if lists is not None else round(4 * math.sqrt(n))
        self.lists = max(1, min(wanted, n // MIN_VECTORS_PER_LIST))
        self.probes = min(probes, self.lists)
        self.quantizer = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFFlat(self.quantizer, dim, self.lists, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.min_points_per_centroid = 1  # `lists` is clamped above; no warning for a small gallery's one cell
        self.index.train(self.vectors)
        self.index.add(self.vectors)
        self.index.nprobe = self.probes
        self.exact = ExactSearch(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self.vectors))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if len(short):
            rows[short], scores[short] = self.exact.search(queries[short], k)
        return rows.astype(np.int64, copy=False), scores


class SearchSection(Section):
    """How the dual-encoder stage finds a query's nearest gallery vectors."""

    method: Literal["exact", "ivf"] = Field(
        "exact", description="exact: one matrix product over every vector; ivf: FAISS IVF-Flat (needs faiss-cpu, "
        "pip install 'mengzi-ray[ann]'), for galleries of about 100,000 and more")
    lists: int | None = Field(None, ge=1, description="ivf: k-means cells (None: 4·sqrt(gallery size))")
    probes: int = Field(8, ge=1, description="ivf: cells scanned per query (more: slower, closer to exact)")

    def build(self, vectors: np.ndarray) -> VectorSearch:
        """A searcher over `vectors` (n, dim) by this section's method."""
        if self.method == "ivf":
            return IvfSearch(vectors, self.lists, self.probes)
        return ExactSearch(vectors)
