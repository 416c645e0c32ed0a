"""Top-k inner-product search over a fixed set of unit vectors: exact (the default) or FAISS IVF-Flat (opt-in).

Serve's dual-encoder candidate stage (serving/dual_stage.py) builds one searcher per gallery side when the gallery
loads (`build_search`, from the retriever's `search` section: index/card.py `SearchSection`). Exact search is a
matrix product (index/store.py): about 2.8 ms a query at 100,000 vectors of 64 dims and 14 ms at 256 dims on 2
cores. IVF-Flat (FAISS's `IndexIVFFlat`) clusters the vectors into `lists` cells with k-means and scans only the
`probes` cells nearest the query. At 100,000 vectors (bench/bench_index_search.py, 64 / 256 dims) 8 probes find
the exact top 10 (recall 1.000 / 0.998) in 0.15 / 0.28 ms, but only 0.74 / 0.57 of the exact top 200, the size of
Serve's shortlist; the default 32 probes keep 0.90 / 0.69 of it in 0.18 / 0.46 ms, 128 probes 0.98 / 0.86 in
0.44 / 1.15 ms. So `probes` trades the shortlist's recall for speed, and it is worth measuring on the real gallery.
FAISS is an optional dependency (`pip install 'mengzi-ray[ann]'`, which installs faiss-cpu), imported only when an
IVF search is built.

The cells are trained when the searcher is built, not stored with the index, so the index on disk stays plain
Parquet (readable by pyarrow, pandas or DuckDB) and valid for any `lists`; training takes about 5 s at 100,000
vectors of 256 dims. FAISS's k-means has a fixed seed, so the same vectors give the same cells. FAISS keeps its own
float32 copy of the vectors beside the array exact search needs, so an IVF side holds its vectors twice.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from mengzi_ray.index.card import SearchSection
from mengzi_ray.index.store import inner_products, top_k

# FAISS warns below 39 training vectors per cell; fewer cells than that are trained on too little data to be useful
MIN_VECTORS_PER_LIST = 39


class VectorSearch(Protocol):
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows per query (Q, dim): (indices (Q, k'), scores (Q, k')) best first, k' = min(k, n)."""
        ...

    def describe(self) -> str:
        """The method and its settings, for logs and /v1/models."""
        ...


class ExactSearch:
    """Every vector scored by one matrix product; ties ordered by row."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k(inner_products(queries, self.vectors), k)

    def describe(self) -> str:
        return "exact"


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
    probes: cells scanned per query; more is slower and closer to exact. A search for k rows scans at least enough
    cells to hold 2k vectors on average (`probes_for`), so a long shortlist widens the scan instead of coming back
    short; a query whose scanned cells still hold fewer than k vectors is answered by exact search, so a search never
    returns fewer than min(k, n) rows."""

    def __init__(self, vectors: np.ndarray, lists: int | None = None, probes: int = 32):
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"an IVF search needs a non-empty (n, dim) matrix, got shape {vectors.shape}")
        if (lists is not None and lists < 1) or probes < 1:
            raise ValueError(f"an IVF search needs lists >= 1 and probes >= 1, got lists={lists}, probes={probes}")
        self.faiss = import_faiss()
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = self.vectors.shape
        wanted = lists if lists is not None else round(4 * math.sqrt(n))
        self.lists = max(1, min(wanted, n // MIN_VECTORS_PER_LIST))
        self.probes = min(probes, self.lists)
        self._match_torch_threads()
        self.quantizer = self.faiss.IndexFlatIP(dim)  # kept: the IVF index holds only a raw pointer to it
        self.index = self.faiss.IndexIVFFlat(self.quantizer, dim, self.lists, self.faiss.METRIC_INNER_PRODUCT)
        self.index.cp.min_points_per_centroid = 1  # `lists` is clamped above; no warning for a small gallery's one cell
        self.index.train(self.vectors)
        self.index.add(self.vectors)
        self.exact = ExactSearch(self.vectors)

    def _match_torch_threads(self) -> None:
        # FAISS's OpenMP team the size of torch's, so that the cross-encoder re-rank that follows keeps its cores.
        # The setting is per calling thread, and Serve searches from a worker thread: set it on every call.
        self.faiss.omp_set_num_threads(torch.get_num_threads())

    def probes_for(self, k: int) -> int:
        """Cells to scan for k rows: `probes`, or enough cells to hold 2k vectors on average, at most every cell."""
        return min(self.lists, max(self.probes, math.ceil(2 * k * self.lists / len(self.vectors))))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self.vectors))
        self._match_torch_threads()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = self.faiss.SearchParametersIVF(nprobe=self.probes_for(k))
        scores, rows = self.index.search(queries, k, params=params)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if len(short):
            rows[short], scores[short] = self.exact.search(queries[short], k)
        return rows.astype(np.int64, copy=False), scores

    def describe(self) -> str:
        return f"ivf (lists {self.lists}, probes {self.probes})"


def build_search(vectors: np.ndarray, section: SearchSection) -> ExactSearch | IvfSearch:
    """A searcher over `vectors` (n, dim) by the section's method (Serve's `retriever.search`)."""
    if section.method == "ivf":
        return IvfSearch(vectors, section.lists, section.probes)
    return ExactSearch(vectors)
