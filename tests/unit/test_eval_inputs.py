"""Evaluate-job inputs: references, predictions files, coverage checks and the card (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from mengzi_ray.config import ConfigError, load_card, validate_card
from mengzi_ray.evaluation.card import EvaluateCard
from mengzi_ray.evaluation.references import (
    PREDICTION_SCHEMA,
    check_coverage,
    load_references,
    pred_tsv_name,
    read_predictions,
    write_pred_tsv,
    write_predictions,
)

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_references_from_text_jsonl_keep_the_split_and_kind(tmp_path):
    path = _jsonl(
        tmp_path / "text.jsonl",
        [
            {"image_id": "a", "text": "红色的圆形", "kind": "caption", "split": "val"},
            {"image_id": "a", "text": "一个红色的圆形", "kind": "caption", "split": "val"},
            {"image_id": "b", "text": "蓝色的正方形", "kind": "caption", "split": "train"},
            {"image_id": "a", "text": "什么颜色", "kind": "question", "split": "val"},
        ],
    )
    assert load_references(path, "val") == {"a": ["红色的圆形", "一个红色的圆形"]}
    with pytest.raises(ValueError, match="no caption rows of split 'test'"):
        load_references(path, "test")


def test_references_from_coco_json_use_string_ids(tmp_path):
    path = tmp_path / "val_coco_format.json"
    coco = {"annotations": [{"image_id": 7, "caption": "两个人", "id": 1}, {"image_id": 7, "caption": "骑马", "id": 2}]}
    path.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    assert load_references(path) == {"7": ["两个人", "骑马"]}
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_references(path)


def test_coverage_errors_count_referenced_images_without_features():
    assert check_coverage(["b", "a"], ["a", "x", "b"], "feats") == ["a", "b"]  # feature order; x not evaluated
    with pytest.raises(ValueError, match=r"2 of 3 referenced images have no features"):
        check_coverage(["a", "m", "n"], ["a", "b"], "feats")
    with pytest.raises(ValueError, match="1 image ids occur twice"):
        check_coverage(["a"], ["a", "a"], "feats")


def test_predictions_round_trip_through_parquet_and_pred_tsv(tmp_path):
    table = pa.Table.from_pylist(
        [{"image_id": "a", "caption": "红色的圆形", "score": 0.5}, {"image_id": "b", "caption": "蓝色", "score": 0.25}],
        schema=PREDICTION_SCHEMA,
    )
    name = pred_tsv_name("synthetic", "val", 5, 20, True)
    assert name == "pred.synthetic.val.beam5.max20.odlabels.tsv"
    tsv = write_pred_tsv(table, tmp_path / name)
    first = tsv.read_text(encoding="utf-8").splitlines()[0]
    assert first == 'a\t[{"caption": "红色的圆形", "conf": 0.5}]'
    expected = {"a": "红色的圆形", "b": "蓝色"}
    assert read_predictions(tsv) == expected
    assert read_predictions(write_predictions(table, tmp_path / "p.parquet")) == expected


def test_bad_prediction_files_name_the_problem(tmp_path):
    bad = tmp_path / "pred.tsv"
    bad.write_text('a\t[{"caption": "x"}]\nb no tab here\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pred.tsv:2: expected"):
        read_predictions(bad)
    twice = tmp_path / "twice.tsv"
    twice.write_text('a\t[{"caption": "x"}]\na\t[{"caption": "y"}]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="1 image ids predicted more than once"):
        read_predictions(twice)


def _card(**changes) -> dict:
    card = {
        "task": "retrieval",
        "model_dir": "m",
        "features": "f",
        "references": "r.jsonl",
        "output_dir": "o",
        "actors": {"batch_size": 32},
        "retrieval": {"chunk_size": 64},
    }
    card.update(changes)
    return card


def test_card_rules():
    assert validate_card(EvaluateCard, _card(), "t").retrieval.mode == "cross"
    with pytest.raises(ConfigError, match="multiple of actors.batch_size"):
        validate_card(EvaluateCard, _card(retrieval={"chunk_size": 48}), "t")
    with pytest.raises(ConfigError, match="candidates is required with mode rerank"):
        validate_card(EvaluateCard, _card(retrieval={"chunk_size": 64, "mode": "rerank"}), "t")
    with pytest.raises(ConfigError, match="retrieval.chunk_sise"):
        validate_card(EvaluateCard, _card(retrieval={"chunk_sise": 64}), "t")
    with pytest.raises(ConfigError, match="caption.tokenizations"):
        validate_card(EvaluateCard, _card(task="caption", caption={"tokenizations": ["ptb"]}), "t")


@pytest.mark.parametrize("name", ["eval_caption_aic", "eval_retrieval_aic1k", "eval_caption_tiny", "eval_retrieval_tiny"])
def test_job_cards_validate_and_model_dir_is_overridable(name):
    card = load_card(EvaluateCard, JOBS / f"{name}.yaml", ["model_dir=elsewhere/model"])
    assert card.model_dir == "elsewhere/model"
    if name == "eval_retrieval_aic1k":
        assert (card.retrieval.num_images, card.retrieval.captions_per_image, card.retrieval.mode) == (1000, 5, "cross")
