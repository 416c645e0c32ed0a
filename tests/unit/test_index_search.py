"""The dual-encoder stage's vector search: exact by default; FAISS IVF-Flat as an option that finds what exact search
finds on clustered vectors, never returns a short row, is deterministic, and fails clearly without faiss."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mengzi_ray.index.card import SearchSection
from mengzi_ray.index.search import ExactSearch, IvfSearch, build_search
from mengzi_ray.index.store import inner_products


def clustered(n: int, dim: int, centres: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around `centres` random centres, and 50 queries from the same mixture (as embeddings are)."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        points = middle[rng.integers(0, centres, count)] + 0.3 * rng.standard_normal((count, dim)).astype(np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    return draw(n), draw(50)


def test_ivf_finds_the_exact_top_10_on_clustered_vectors() -> None:
    vectors, queries = clustered(30000, 32, 300, seed=0)
    ivf = IvfSearch(vectors, probes=8)
    assert ivf.lists == round(4 * np.sqrt(30000)) and ivf.probes == 8
    rows, scores = ivf.search(queries, 10)
    exact, _ = ExactSearch(vectors).search(queries, 10)
    assert rows.shape == scores.shape == (50, 10) and rows.dtype == np.int64
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
    assert recall >= 0.95, recall
    # the scores are the rows' inner products, best first
    np.testing.assert_allclose(scores, np.take_along_axis(inner_products(queries, vectors), rows, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    again, _ = IvfSearch(vectors, probes=8).search(queries, 10)
    assert np.array_equal(again, rows)  # FAISS's k-means is seeded: the same vectors give the same cells


def test_every_cell_probed_is_exact_search() -> None:
    vectors, queries = clustered(400, 16, 8, seed=1)
    ivf = IvfSearch(vectors, lists=10, probes=10)
    exact_rows, exact_scores = ExactSearch(vectors).search(queries, 7)
    rows, scores = ivf.search(queries, 7)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    assert (rows == exact_rows).mean() > 0.99  # only exact ties may order differently


def test_cells_are_clamped_to_the_gallery_and_short_rows_fall_back_to_exact() -> None:
    vectors, _ = clustered(20, 8, 2, seed=2)  # fewer vectors than one cell wants: a single cell, exhaustive
    small = IvfSearch(vectors, lists=64, probes=8)
    assert (small.lists, small.probes) == (1, 1)
    assert np.array_equal(small.search(vectors[:3], 50)[0], ExactSearch(vectors).search(vectors[:3], 50)[0])
    # 80 vectors in one tight cluster and 5 in another: the one probed cell of a query at the small cluster holds
    # fewer than k vectors, so FAISS pads with -1; that query is answered by exact search instead
    rng = np.random.default_rng(3)
    big = np.tile([1.0, 0.0], (80, 1)) + 0.01 * rng.standard_normal((80, 2))
    few = np.tile([0.0, 1.0], (5, 1)) + 0.01 * rng.standard_normal((5, 2))
    uneven = np.concatenate([big, few]).astype(np.float32)
    ivf = IvfSearch(uneven, lists=2, probes=1)
    query = np.array([[0.0, 1.0]], np.float32)
    rows, scores = ivf.search(query, 10)
    exact_rows, exact_scores = ExactSearch(uneven).search(query, 10)
    assert (rows >= 0).all() and set(rows[0].tolist()) == set(exact_rows[0].tolist())
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    with pytest.raises(ValueError, match="k must be positive"):
        ivf.search(query, 0)
    with pytest.raises(ValueError, match="non-empty"):
        IvfSearch(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="probes >= 1"):
        IvfSearch(uneven, probes=0)
    with pytest.raises(ValueError, match="lists >= 1"):
        IvfSearch(uneven, lists=0)


class NoExactSearch:
    def search(self, queries: np.ndarray, k: int):
        raise AssertionError("fell back to exact search")


def test_a_long_shortlist_widens_the_scan_instead_of_falling_back() -> None:
    vectors, queries = clustered(4000, 16, 40, seed=6)
    ivf = IvfSearch(vectors, probes=4)
    assert ivf.lists == 4000 // 39 and ivf.probes_for(10) == 4
    assert ivf.probes_for(1000) == int(np.ceil(2 * 1000 * ivf.lists / 4000)) and ivf.probes_for(4000) == ivf.lists
    ivf.exact = NoExactSearch()  # 1,000 rows come from the scanned cells alone
    rows, scores = ivf.search(queries, 1000)
    assert rows.shape == (50, 1000) and (rows >= 0).all()
    exact, _ = ExactSearch(vectors).search(queries, 10)
    assert np.mean([set(e) <= set(r) for e, r in zip(exact.tolist(), rows.tolist())]) >= 0.95


def test_every_search_sizes_faiss_threads_like_torch_in_its_own_thread() -> None:
    import threading

    import faiss

    vectors, queries = clustered(400, 8, 4, seed=7)
    ivf = IvfSearch(vectors)
    seen = []

    def search_in_a_worker_thread() -> None:  # as Serve runs engine.search (asyncio.to_thread)
        faiss.omp_set_num_threads(7)
        ivf.search(queries, 5)
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search_in_a_worker_thread)
    worker.start()
    worker.join()
    assert seen == [torch.get_num_threads()]


def test_the_section_builds_exact_by_default_and_ivf_on_request() -> None:
    vectors, queries = clustered(300, 8, 4, seed=4)
    default = build_search(vectors, SearchSection())
    assert isinstance(default, ExactSearch)
    ivf = build_search(vectors, SearchSection(method="ivf", lists=4, probes=2))
    assert isinstance(ivf, IvfSearch) and (ivf.lists, ivf.probes) == (4, 2)
    with pytest.raises(ValidationError, match="method"):
        SearchSection(method="hnsw")
    with pytest.raises(ValidationError, match="probes"):
        SearchSection(method="ivf", probes=0)


def test_ivf_without_faiss_names_the_package_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` sees where faiss-cpu is not installed
    vectors, _ = clustered(100, 8, 2, seed=5)
    with pytest.raises(ImportError, match=r"pip install 'mengzi-ray\[ann\]'"):
        build_search(vectors, SearchSection(method="ivf"))
    assert isinstance(build_search(vectors, SearchSection()), ExactSearch)  # exact search needs no faiss
