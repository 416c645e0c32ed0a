"""Pair scoring without Ray: the pair index, gallery rules, chunk independence, re-rank candidate lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mengzi_ray.evaluation.retrieval_eval import CrossPairs, PairScorer, build_gallery, rerank_pairs
from mengzi_ray.modeling import OscarConfig, OscarForRetrieval
from mengzi_ray.text import build_vocab, write_vocab

REFS = {
    "a": ["红色的圆形", "一个红色的圆形"],
    "b": ["蓝色的正方形", "蓝色的正方形在左边"],
    "c": ["绿色的三角形", "黄色的圆形在上面"],
}


def _regions(seed: int) -> dict[str, tuple[np.ndarray, str, str]]:
    rng = np.random.default_rng(seed)
    tags = {"a": "圆形", "b": "正方形", "c": "三角形 圆形"}
    return {k: (rng.normal(size=(1 + n, 2054)).astype(np.float32), tags[k], "") for n, k in enumerate(REFS)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair_scoring")
    write_vocab(build_vocab([t for v in REFS.values() for t in v] + ["三角形 圆形 正方形"]), root / "vocab.txt")
    torch.manual_seed(0)
    config = OscarConfig(
        vocab_size=sum(1 for _ in open(root / "vocab.txt", encoding="utf-8")), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, max_seq_length=24,
        max_seq_a_length=24, max_img_seq_length=4,
    )
    return OscarForRetrieval(config).save_pretrained(root / "model", vocab_file=root / "vocab.txt")


def test_cross_pairs_follow_oscar_index_layout():
    images, texts = CrossPairs(num_images=3, num_texts=6).pairs(5, 9)
    assert images.tolist() == [0, 1, 1, 1] and texts.tolist() == [5, 0, 1, 2]
    assert CrossPairs(3, 6).num_pairs == 18


def test_gallery_takes_first_k_captions_and_rejects_short_images():
    gallery = build_gallery(["b", "a"], REFS, _regions(0), captions_per_image=1)
    assert gallery.texts == ["蓝色的正方形", "红色的圆形"] and gallery.text_to_image.tolist() == [0, 1]
    with pytest.raises(ValueError, match="3 of 3 gallery images have fewer than 3 captions"):
        build_gallery(["a", "b", "c"], REFS, _regions(0), captions_per_image=3)
    with pytest.raises(ValueError, match="empty gallery"):
        build_gallery([], REFS, _regions(0), captions_per_image=1)
    with pytest.raises(ValueError, match="1 gallery images have no features"):
        build_gallery(["a", "z"], {**REFS, "z": ["x"]}, _regions(0), captions_per_image=1)


def test_scores_do_not_depend_on_chunking(model_dir):
    gallery = build_gallery(list(REFS), REFS, _regions(1), captions_per_image=2)
    pairs = CrossPairs(gallery.num_images, gallery.num_texts)
    scorer = PairScorer(str(model_dir), gallery, pairs, batch_size=4, use_gpu=False)
    _, whole = scorer.score(0, pairs.num_pairs)
    pieces = [scorer.score(lo, min(lo + 8, pairs.num_pairs))[1] for lo in range(0, pairs.num_pairs, 8)]
    assert whole.shape == (18,) and whole.dtype == np.float32
    assert np.array_equal(whole, np.concatenate(pieces))
    assert ((whole > 0) & (whole < 1)).all()
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        scorer.score(3, 8)


def test_rerank_candidates_become_pairs_and_labels():
    gallery = build_gallery(list(REFS), REFS, _regions(0), captions_per_image=2)
    pairs, labels, queries = rerank_pairs(gallery, {"a": [("b", 1), ("a", 0)], "c": [("c", 1), ("a", 1)]}, 2)
    assert queries == ["a", "c"]
    assert pairs.images.tolist() == [0, 0, 2, 2] and pairs.texts.tolist() == [3, 0, 5, 1]
    assert labels.tolist() == [[False, True], [True, False]]
    with pytest.raises(ValueError, match="1 candidate-file images are not in the gallery"):
        rerank_pairs(gallery, {"a": [("q", 0)]}, 2)
    with pytest.raises(ValueError, match="same non-zero number"):
        rerank_pairs(gallery, {"a": [("a", 0)], "b": []}, 2)
    with pytest.raises(ValueError, match="1 candidates have a caption index outside 0..1"):
        rerank_pairs(gallery, {"a": [("a", 2)]}, 2)
