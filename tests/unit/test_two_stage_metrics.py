"""Two-stage R@K from the cross-encoder grid and a first-stage grid: a full shortlist is the cross-encoder's own
ranking, a shortlist that misses the right item misses it, and re-ranking orders the shortlist by the cross-encoder."""

from __future__ import annotations

import numpy as np
import pytest

from mengzi_ray.evaluation.retrieval_metrics import retrieval_recall
from mengzi_ray.evaluation.two_stage import two_stage_recall


def test_a_shortlist_of_everything_is_the_cross_encoder_ranking() -> None:
    rng = np.random.default_rng(0)
    cross, first = rng.random((6, 12)), rng.standard_normal((6, 12))
    text_to_image = np.repeat(np.arange(6), 2)
    assert two_stage_recall(cross, first, text_to_image, 12, (1, 5)) == retrieval_recall(cross, text_to_image, (1, 5))


def test_the_shortlist_bounds_and_the_cross_encoder_orders() -> None:
    text_to_image = np.arange(3)
    cross = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.2, 0.6]])  # image × text
    # first stage: text 0 shortlists images {1, 2} (misses 0); texts 1, 2 shortlist their own image among two
    first = np.array([[0.0, 0.5, 0.1], [0.9, 0.9, 0.0], [0.8, 0.0, 0.9]])
    got = two_stage_recall(cross, first, text_to_image, 2, (1, 2, 3))
    # t2i: text 0's image is outside its shortlist → ranks after both shortlisted (rank 2); text 1: images {0, 1}
    # re-ranked by cross (0.1 vs 0.7) → rank 0; text 2: images {0, 2} → 0.6 beats 0.2 → rank 0
    assert (got["t2i_R@1"], got["t2i_R@2"], got["t2i_R@3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    # i2t: image 0 shortlists texts {1, 2} by first (0.5, 0.1), misses text 0; image 1 {0, 1}: cross 0.8 > 0.7 → rank 1;
    # image 2 {0, 2}: cross 0.6 > 0.1 → rank 0
    assert (got["i2t_R@1"], got["i2t_R@2"], got["i2t_R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    with pytest.raises(ValueError, match="differ in shape"):
        two_stage_recall(cross, first[:2], text_to_image, 2, (1,))


def test_dual_encoder_report_on_a_model_dir(tmp_path) -> None:
    from pathlib import Path

    from mengzi_ray.config import load_card
    from mengzi_ray.synthetic import write_synthetic_dataset
    from mengzi_ray.evaluation.feature_io import load_regions
    from mengzi_ray.evaluation.retrieval_eval import build_gallery
    from mengzi_ray.evaluation.two_stage import dual_encoder_report
    from mengzi_ray.data.records import read_text_rows
    from mengzi_ray.modeling import OscarForRetrieval
    from mengzi_ray.training.card import RetrievalCard
    from mengzi_ray.training.jobs import prepare_init

    ds = write_synthetic_dataset(tmp_path / "syn", num_train=2, num_val=8, unique=True)
    card = load_card(RetrievalCard, Path(__file__).resolve().parents[2] / "jobs" / "retrieval_tiny.yaml", [
        f"data.features={ds.root}/features", f"data.text={ds.text_path}", f"run.storage_path={tmp_path}"])
    init_dir, _ = prepare_init(card, str(tmp_path / "run"))
    model_dir = OscarForRetrieval.from_pretrained(init_dir, dual_encoder_dim=8, max_seq_length=40).save_pretrained(tmp_path / "m")
    ids = [f"val/{i:06d}" for i in range(8)]
    refs: dict[str, list[str]] = {}
    for row in read_text_rows(ds.text_path):
        refs.setdefault(row["image_id"], []).append(row["text"])
    gallery = build_gallery(ids, refs, load_regions(str(ds.features_path), ids), 3)
    cross = np.random.default_rng(1).random((8, 24))
    report = dual_encoder_report(str(model_dir), gallery, cross, [4, 24], (1, 5))
    assert set(report["metrics"]) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "rsum"}
    assert report["two_stage"]["24"] == retrieval_recall(cross, gallery.text_to_image, (1, 5))
    assert set(report["two_stage"]) == {"4", "24"}


def test_image_queries_rank_by_their_own_first_stage_grid() -> None:
    text_to_image = np.arange(3)
    cross = np.array([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.2, 0.6]])
    first = np.array([[0.0, 0.5, 0.1], [0.9, 0.9, 0.0], [0.8, 0.0, 0.9]])
    both = two_stage_recall(cross, first, text_to_image, 2, (1,))
    # an i2t grid that shortlists every image's own text: i2t is the cross-encoder's ranking within the shortlist
    own = np.eye(3) + 0.5 * np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    split = two_stage_recall(cross, first, text_to_image, 2, (1,), first_i2t=own)
    assert split["t2i_R@1"] == both["t2i_R@1"]  # text queries still use `first`
    # image 0 {0, 2}: 0.9 > 0.2 → hit; image 1 {1, 0}: 0.8 > 0.7 → miss; image 2 {2, 1}: 0.6 > 0.2 → hit
    assert split["i2t_R@1"] == pytest.approx(2 / 3) and both["i2t_R@1"] == pytest.approx(1 / 3)


def test_tfidf_report_ranks_by_shared_characters_and_a_full_shortlist_is_the_cross_encoder() -> None:
    from mengzi_ray.evaluation.retrieval_eval import Gallery
    from mengzi_ray.evaluation.two_stage import tfidf_report, tfidf_scores

    od_labels = ["红色 圆形", "蓝色 正方形", "绿色 三角形"]
    texts = ["一个红色的圆形", "红圆", "蓝色的正方形", "一个正方形", "绿色三角形", "三角"]
    gallery = Gallery(image_ids=["a", "b", "c"], regions=[np.zeros((1, 4), np.float32)] * 3, od_labels=od_labels, texts=texts,
                      text_to_image=np.repeat(np.arange(3), 2))
    t2i, i2t = tfidf_scores(gallery)
    assert t2i.shape == i2t.shape == (3, 6)
    assert (t2i.argmax(axis=0) == gallery.text_to_image).all()  # every text's best image shares its characters
    assert (i2t.argmax(axis=1) == [0, 2, 4]).all()
    cross = np.random.default_rng(1).random((3, 6))
    report = tfidf_report(gallery, cross, [2, 6], (1, 2))
    assert report["metrics"]["t2i_R@1"] == 1.0
    assert report["two_stage"]["6"] == retrieval_recall(cross, gallery.text_to_image, (1, 2))
