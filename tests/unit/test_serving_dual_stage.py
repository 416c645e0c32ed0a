"""Serve's two-stage search with the dual encoder as the candidate stage: chosen automatically for a model dir that
has one, TF-IDF otherwise; vectors from an index or embedded at load agree; bad set-ups fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mengzi_ray.config import load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.index.card import SearchSection
from mengzi_ray.index.search import ExactSearch, IvfSearch
from mengzi_ray.index.store import embedding_table, inner_products
from mengzi_ray.modeling import OscarForRetrieval
from mengzi_ray.serving.gallery import load_gallery
from mengzi_ray.inference import MatchScorer
from mengzi_ray.serving.retrieval import RetrievalEngine, SearchQuery
from mengzi_ray.serving.deployments import BatchStats, Retriever
from mengzi_ray.serving.settings import GallerySection, RetrieverSection
from mengzi_ray.training.card import RetrievalCard
from mengzi_ray.training.jobs import prepare_init

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dualserve")
    ds = write_synthetic_dataset(root / "syn", num_train=2, num_val=30, unique=True)
    card = load_card(RetrievalCard, JOBS / "retrieval_tiny.yaml", [
        f"data.features={ds.root}/features", f"data.text={ds.text_path}", f"run.storage_path={root}",
        "retrieval.max_seq_length=40"])
    init_dir, _ = prepare_init(card, str(root / "run"))
    dual = OscarForRetrieval.from_pretrained(init_dir, dual_encoder_dim=16, max_seq_length=40).save_pretrained(root / "dual")
    plain = OscarForRetrieval.from_pretrained(init_dir, max_seq_length=40).save_pretrained(root / "plain")
    section = GallerySection(features=str(ds.features_path), texts=str(ds.text_path), split="val")
    return root, section, MatchScorer.from_model_dir(str(dual)), MatchScorer.from_model_dir(str(plain))


def test_dual_stage_shortlists_and_the_cross_encoder_reranks(setup) -> None:
    root, section, dual, plain = setup
    gallery = load_gallery(section)
    engine = RetrievalEngine(dual, gallery, candidates=5)
    assert engine.first_stage == "dual_encoder"
    query = gallery.captions[7]
    (hits,) = engine.search([SearchQuery(k=3, text=query)])
    shortlist = set(engine.dual.images_for([query], 5)[0].tolist())
    assert len(hits) == 3 and {h.index for h in hits} <= shortlist
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    brute = RetrievalEngine(dual, gallery, candidates=None).search([SearchQuery(k=3, text=query)])[0]
    wide = RetrievalEngine(dual, gallery, candidates=len(gallery)).search([SearchQuery(k=3, text=query)])[0]
    assert [h.index for h in wide] == [h.index for h in brute]  # a shortlist of everything is brute force
    (captions,) = engine.search([SearchQuery(k=2, regions=gallery.regions[0])])
    assert len(captions) == 2 and all(0 <= h.index < len(gallery.captions) for h in captions)
    assert RetrievalEngine(dual, gallery, 5, first_stage="tfidf").dual is None
    assert RetrievalEngine(plain, gallery, 5).first_stage == "tfidf"  # a dir without a dual encoder still serves
    with pytest.raises(ValueError, match="no dual encoder"):
        RetrievalEngine(plain, gallery, 5, first_stage="dual_encoder")


def test_the_dual_stage_searches_exactly_unless_asked_for_ivf(setup) -> None:
    _, section, dual, _ = setup
    gallery = load_gallery(section)
    exact = RetrievalEngine(dual, gallery, candidates=5)
    assert isinstance(exact.dual.image_search, ExactSearch) and isinstance(exact.dual.caption_search, ExactSearch)
    ivf = RetrievalEngine(dual, gallery, candidates=5, search=SearchSection(method="ivf", probes=4))
    assert isinstance(ivf.dual.image_search, IvfSearch) and isinstance(ivf.dual.caption_search, IvfSearch)
    texts = gallery.captions[:4]
    # 30 images make one IVF cell, which every query probes: the same shortlists as exact search
    for a, b in zip(ivf.dual.images_for(texts, 5), exact.dual.images_for(texts, 5)):
        assert set(a.tolist()) == set(b.tolist())
    for a, b in zip(ivf.dual.captions_for(gallery.regions[:2], 5), exact.dual.captions_for(gallery.regions[:2], 5)):
        assert set(a.tolist()) == set(b.tolist())
    ivf.set_gallery(gallery)  # a gallery reload keeps the section's search method
    assert isinstance(ivf.dual.image_search, IvfSearch)


def test_the_retriever_deployment_takes_its_search_method_from_the_config(setup, monkeypatch) -> None:
    root, section, _, _ = setup
    monkeypatch.setattr(BatchStats, "as_dict", lambda self: {})  # the stats name the Serve replica, and there is none
    config = RetrieverSection.model_validate({"model_dir": str(root / "dual"), "gallery": section.model_dump(),
                                              "candidates": 5, "search": {"method": "ivf", "probes": 2}})
    replica = Retriever.func_or_class(config)  # the class as written, outside a Serve replica
    assert isinstance(replica.engine.dual.image_search, IvfSearch)
    assert replica.info()["candidate_stage"] == "dual-encoder inner product, ivf (lists 1, probes 1) search"
    default = Retriever.func_or_class(config.model_copy(update={"search": SearchSection()}))
    assert default.info()["candidate_stage"] == "dual-encoder inner product, exact search"


def test_index_vectors_equal_the_ones_embedded_at_load(setup, tmp_path: Path) -> None:
    root, section, dual, _ = setup
    gallery = load_gallery(section)
    engine = RetrievalEngine(dual, gallery, candidates=5)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    order = np.arange(len(gallery))[::-1]  # the index's row order is its own
    pq.write_table(embedding_table([gallery.image_ids[i] for i in order], engine.dual.image_vectors[order]),
                   index_dir / "part-0.parquet")
    from_index = RetrievalEngine(dual, gallery, candidates=5, index_uri=str(index_dir))
    assert np.array_equal(from_index.dual.image_vectors, engine.dual.image_vectors)
    pq.write_table(embedding_table(gallery.image_ids[:4], engine.dual.image_vectors[:4]), index_dir / "part-0.parquet")
    with pytest.raises(ValueError, match="26 of 30 gallery images are not in the index"):
        RetrievalEngine(dual, gallery, candidates=5, index_uri=str(index_dir))


def test_exact_search_ranks_by_inner_product_with_ties_by_row() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = vectors[3]  # a tie: the lower row comes first
    queries = np.stack([vectors[3], rng.standard_normal(8).astype(np.float32)])
    scores = inner_products(queries, vectors)
    assert scores.dtype == np.float32 and scores.shape == (2, 50)
    np.testing.assert_allclose(scores, queries.astype(np.float64) @ vectors.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    hits, best = ExactSearch(vectors).search(queries, 5)
    expected = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1, kind="stable")[:, :5]
    assert hits.tolist() == expected.tolist() and hits[0, :2].tolist() == [3, 7]
    np.testing.assert_array_equal(best, np.take_along_axis(scores, hits, axis=1))
