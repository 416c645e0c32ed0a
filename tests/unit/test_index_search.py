"""The dual-encoder stage's vector search: exact by default; FAISS IVF-Flat as an option that finds what exact search
finds on clustered vectors, never returns a short row, is deterministic, and fails clearly without faiss."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from pydantic import ValidationError

from mengzi_ray.index.search import ExactSearch, IvfSearch, SearchSection
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


def test_the_section_builds_exact_by_default_and_ivf_on_request() -> None:
    vectors, queries = clustered(300, 8, 4, seed=4)
    default = SearchSection().build(vectors)
    assert isinstance(default, ExactSearch)
    ivf = SearchSection(method="ivf", lists=4, probes=2).build(vectors)
    assert isinstance(ivf, IvfSearch) and (ivf.lists, ivf.probes) == (4, 2)
    with pytest.raises(ValidationError, match="method"):
        SearchSection(method="hnsw")
    with pytest.raises(ValidationError, match="probes"):
        SearchSection(method="ivf", probes=0)


def test_ivf_without_faiss_names_the_package_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` sees where faiss-cpu is not installed
    vectors, _ = clustered(100, 8, 2, seed=5)
    with pytest.raises(ImportError, match=r"pip install 'mengzi-ray\[ann\]'"):
        SearchSection(method="ivf").build(vectors)
    assert isinstance(SearchSection().build(vectors), ExactSearch)  # exact search needs no faiss
