"""Model dirs record their input layout: original dirs through training_args.bin (restricted unpickler), ours in
config.json; evaluation and serving use it, and a card that contradicts it is refused."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mengzi_ray.config import ConfigError, validate_card
from mengzi_ray.evaluation.card import EvaluateCard, ModelLayoutSection
from mengzi_ray.evaluation.jobs import _model_layout as model_layout_of
from mengzi_ray.evaluation.retrieval_eval import CrossPairs, PairScorer, build_gallery
from mengzi_ray.modeling import OscarConfig, OscarForRetrieval
from mengzi_ray.modeling.model_dir import read_training_args
from mengzi_ray.inference import MatchScorer
from mengzi_ray.text import build_vocab, write_vocab

LAYOUT_KEYS = ("max_seq_a_length", "max_seq_length", "max_img_seq_length", "add_od_labels", "do_lower_case",
               "att_mask_type", "od_label_type", "tag_map", "layout_source")
REFS = {"a": ["红色的圆形", "一个红色的圆形"], "b": ["蓝色的正方形", "蓝色的正方形在左边"]}


def tiny(**overrides) -> OscarConfig:
    values = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=80, max_seq_length=24, max_seq_a_length=24)
    return OscarConfig(**{**values, **overrides})


def original_dir(root: Path, args: argparse.Namespace | None, legacy: bool = False) -> Path:
    """A Mengzi-style released dir: config.json without layout keys, pytorch_model.bin, vocab.txt, training_args."""
    root.mkdir(parents=True)
    write_vocab(build_vocab([t for v in REFS.values() for t in v] + ["圆形 正方形 机场 航空站"]), root / "vocab.txt")
    vocab_size = sum(1 for _ in open(root / "vocab.txt", encoding="utf-8"))
    config = tiny(vocab_size=vocab_size)
    model = OscarForRetrieval(config)
    data = {k: v for k, v in config.to_dict().items() if k not in LAYOUT_KEYS}
    (root / "config.json").write_text(json.dumps(data))
    torch.save(model.state_dict(), root / "pytorch_model.bin")
    if args is not None:
        torch.save(args, root / "training_args.bin", _use_new_zipfile_serialization=not legacy)
    return root


def mengzi_args(**overrides) -> argparse.Namespace:
    values = dict(max_seq_length=24, max_img_seq_length=70, add_od_labels=True, od_label_type="vg",
                  do_lower_case=True, att_mask_type="CL", device=torch.device("cpu"), n_gpu=8, learning_rate=2e-5,
                  output_dir="output/", eval_img_keys_file="val_img_keys_1k.pt")
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_original_dir_layout_comes_from_training_args(tmp_path: Path, legacy: bool) -> None:
    model_dir = original_dir(tmp_path / "mengzi-oscar-base-retrieval", mengzi_args(), legacy=legacy)
    assert read_training_args(model_dir / "training_args.bin")["device"] == "cpu"  # torch.device kept as text
    config = OscarConfig.load(model_dir)
    assert (config.max_img_seq_length, config.max_seq_length, config.att_mask_type) == (70, 24, "CL")
    assert config.tag_map == "langboat" and config.layout_source.startswith("training_args.bin")
    bare = original_dir(tmp_path / "no_args", None)
    config = OscarConfig.load(bare)
    assert config.max_img_seq_length == 50 and config.tag_map == "langboat"
    assert "without training_args.bin" in config.layout_source


def test_malicious_training_args_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model_dir = original_dir(tmp_path / "evil", mengzi_args(output_dir=Payload()))
    with pytest.raises(ValueError, match=r"training_args.bin: refused to read training args: global \w+\.system"):
        OscarConfig.load(model_dir)
    torch.save({"w": torch.zeros(2)}, model_dir / "training_args.bin")  # tensors are not training args either
    with pytest.raises(ValueError, match="refused to read training args"):
        read_training_args(model_dir / "training_args.bin")
    assert not marker.exists()


def regions(count: int) -> dict[str, tuple[np.ndarray, str, str]]:
    rng = np.random.default_rng(0)
    return {k: (rng.normal(size=(count, 2054)).astype(np.float32), "圆形", "") for k in REFS}


def test_retrieval_dir_with_70_regions_is_evaluated_and_served_with_70(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    write_vocab(build_vocab([t for v in REFS.values() for t in v] + ["圆形"]), tmp_path / "vocab.txt")
    size = sum(1 for _ in open(tmp_path / "vocab.txt", encoding="utf-8"))
    OscarForRetrieval(tiny(vocab_size=size, max_img_seq_length=70)).save_pretrained(ours, tmp_path / "vocab.txt")
    original = original_dir(tmp_path / "original", mengzi_args(att_mask_type="CLR"))
    gallery = build_gallery(list(REFS), REFS, regions(80), captions_per_image=2)
    for model_dir in (ours, original):
        scorer = PairScorer(str(model_dir), gallery, CrossPairs(2, 4), batch_size=4, use_gpu=False).scorer
        assert scorer.tensorizer.layout.max_img_seq_length == 70
        example = scorer.tensorizer.example(REFS["a"][0], "圆形", gallery.regions[0], 1)
        assert example["img_feats"].shape == (70, 2054)
        served = MatchScorer.from_model_dir(str(model_dir), "cpu")
        assert served.tensorizer.layout.max_img_seq_length == 70
    cased = original_dir(tmp_path / "cased", mengzi_args(att_mask_type="CLR", do_lower_case=False))
    assert MatchScorer.from_model_dir(str(cased), "cpu").tensorizer.tokenizer.do_lower_case is False  # casing recorded
    assert MatchScorer.from_model_dir(str(ours), "cpu").tensorizer.tokenizer.do_lower_case is True


def test_evaluate_card_contradicting_the_dir_is_refused(tmp_path: Path) -> None:
    model_dir = original_dir(tmp_path / "m", mengzi_args())  # trained with att_mask_type CL

    def card(**retrieval) -> EvaluateCard:
        return validate_card(EvaluateCard, {"task": "retrieval", "model_dir": str(model_dir), "features": "f",
                                            "references": "r.jsonl", "output_dir": str(tmp_path / "o"),
                                            "retrieval": retrieval}, "card")

    def _model_layout(c: EvaluateCard, **model_layout) -> tuple[dict, dict]:
        return model_layout_of(c.model_copy(update={"model_layout": ModelLayoutSection(**model_layout)}))

    layout, _ = _model_layout(card())
    assert layout["max_img_seq_length"] == 70 and layout["att_mask_type"] == "CL" and layout["tag_map"] == "langboat"
    assert _model_layout(card(att_mask_type="CL"))[0]["att_mask_type"] == "CL"
    with pytest.raises(ConfigError, match="retrieval.att_mask_type: the card says CLR but model dir .* records CL"):
        _model_layout(card(att_mask_type="CLR"))
    with pytest.raises(ConfigError, match="model_layout.max_img_seq_length: the card says 50 but model dir .* records 70"):
        _model_layout(card(), max_img_seq_length=50)
    # an original dir without training_args.bin: the card's values are the layout, and reach the model actors
    bare = original_dir(tmp_path / "bare", None)
    model_dir = bare
    layout, overrides = _model_layout(card(att_mask_type="CR"), max_img_seq_length=70)
    assert layout["max_img_seq_length"] == 70 and layout["att_mask_type"] == "CR" and layout["tag_map"] == "langboat"
    assert overrides["max_img_seq_length"] == 70 and "model_layout" in layout["layout_source"]
    assert _model_layout(card())[1] == {} and _model_layout(card())[0]["max_img_seq_length"] == 50


def test_a_langboat_model_is_fed_langboat_tags_from_the_english_labels(tmp_path: Path) -> None:
    from mengzi_ray.evaluation.feature_io import od_label_string
    from mengzi_ray.serving.gallery import load_gallery
    from mengzi_ray.serving.settings import GallerySection
    from mengzi_ray.text.tags import TagVocabulary
    from tests.oscar_originals import make_images, write_vinvl_features
    from mengzi_ray.features.oscar_import import run_import
    from mengzi_ray.features.oscar_import.cards import VinvlTsvImport

    labels, stored = ["airport", "dog"], ["机场", "狗"]  # stored with the corrected map
    assert od_label_string(labels, stored, "langboat") == "航空站 狗"
    assert od_label_string(labels, stored, None) == "机场 狗"  # our dirs: the dataset's tags as stored
    images = make_images(2)
    write_vinvl_features(tmp_path / "tsv", images)
    run_import(VinvlTsvImport(format="vinvl", features=str(tmp_path / "tsv" / "features.tsv"),
                              labels=str(tmp_path / "tsv" / "predictions.tsv"), output=str(tmp_path / "ds")))
    section = GallerySection(features=str(tmp_path / "ds" / "features"))
    langboat = load_gallery(section, tag_map="langboat")
    assert langboat.regions[0].tags == TagVocabulary.named("langboat").translate(images[0].classes).tags
    assert load_gallery(section).regions[0].tags == TagVocabulary.default().translate(images[0].classes).tags


def test_serving_feeds_a_released_dir_the_tags_of_its_map(tmp_path: Path) -> None:
    from mengzi_ray.serving.captioning import RegionSet

    model_dir = original_dir(tmp_path / "released", mengzi_args(att_mask_type="CLR"))  # tag map langboat
    encoder = MatchScorer.from_model_dir(str(model_dir), "cpu")
    feats = np.random.default_rng(0).normal(size=(1, 2054)).astype(np.float32)
    detected = RegionSet(feats, ["机场"], ["airport"])  # the detector's corrected tag + its English label
    assert detected.tags_for("langboat") == ["航空站"] and detected.tags_for(None) == ["机场"]
    scores = encoder.score([("红色的圆形", encoder.od_labels(r.labels, r.tags), r.features)
                            for r in (detected, RegionSet(feats, ["航空站"]), RegionSet(feats, ["机场"]))])
    assert scores[0] == scores[1] and scores[0] != scores[2]
