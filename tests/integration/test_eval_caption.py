"""Caption evaluation end to end on the synthetic set: Ray Data inference with model actors, predictions in
Parquet and the original's pred tsv, char + jieba metrics, report + examples PNG; bad inputs are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mengzi_ray.config import ConfigError, validate_card
from mengzi_ray.data.records import load_image_records
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.evaluation.caption_inference import predict_captions
from mengzi_ray.evaluation.card import EvaluateCard
from mengzi_ray.evaluation.jobs import run_evaluate
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import build_vocab, load_tokenizer, write_vocab
from mengzi_ray.inference import Captioner
from tests.system_packages import require_cjk_font, require_java

NUM_VAL = 12
MAX_GEN = 22


@pytest.fixture(scope="module")
def caption_setup(tmp_path_factory):
    """Synthetic data and a tiny random-init captioner (inference plumbing, not quality, is under test)."""
    root = tmp_path_factory.mktemp("eval_caption")
    data = write_synthetic_dataset(root / "data", num_train=8, num_val=NUM_VAL, seed=5)
    train = load_image_records(data.features_path, data.text_path, "train")
    val = load_image_records(data.features_path, data.text_path, "val")
    texts = [t for r in train + val for t in r.texts] + [r.od_labels for r in train + val]
    write_vocab(build_vocab(texts), root / "vocab.txt")
    torch.manual_seed(0)
    config = OscarConfig(
        vocab_size=len(load_tokenizer(root)), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, max_seq_a_length=24, max_seq_length=30,
        max_img_seq_length=4,
    )
    model_dir = OscarForCaptioning(config).save_pretrained(root / "model", vocab_file=root / "vocab.txt")
    return data, model_dir, root


def _card(data, model_dir, out: Path, **caption) -> EvaluateCard:
    card = {
        "task": "caption",
        "model_dir": str(model_dir),
        "features": str(data.features_path),
        "references": str(data.text_path),
        "split": "val",
        "output_dir": str(out),
        "actors": {"num_actors": 2, "batch_size": 4},
        "caption": {"num_beams": 2, "max_gen_length": MAX_GEN, "metrics": ["Bleu", "ROUGE_L", "CIDEr"], **caption},
    }
    return validate_card(EvaluateCard, card, "test")


def test_ray_inference_matches_single_process_decoding(ray_local, caption_setup):
    data, model_dir, _ = caption_setup
    val = load_image_records(data.features_path, data.text_path, "val")
    ids = [r.image_id for r in val][::-1]  # output follows the requested order
    table = predict_captions(
        str(data.features_path), str(model_dir), ids, num_beams=2, max_gen_length=MAX_GEN, num_actors=2, batch_size=4
    )
    assert table.column("image_id").to_pylist() == ids
    local = Captioner.from_model_dir(str(model_dir), "cpu", max_gen_length=MAX_GEN, batch_size=4).caption_records(val, num_beams=2)
    for image_id, caption, score in zip(*(table.column(c).to_pylist() for c in ("image_id", "caption", "score"))):
        assert (caption, score) == local[image_id]  # bit-identical: the actor pool changes no batch and no bit


def test_evaluate_writes_predictions_metrics_and_report(ray_local, caption_setup):
    require_cjk_font()  # the report's examples.png
    require_java()  # METEOR
    data, model_dir, root = caption_setup
    out = root / "eval"
    summary = run_evaluate(_card(data, model_dir, out, write_pred_tsv=True, num_examples=4))
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(summary, ensure_ascii=False))
    assert summary["num_images"] == NUM_VAL
    assert set(summary["metrics"]) == {"char", "jieba"}
    assert set(summary["metrics"]["char"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert summary["warnings"] == ["8 of 20 feature images have no references and are not evaluated"]
    preds = pq.read_table(out / "predictions.parquet")
    assert preds.column_names == ["image_id", "caption", "score"] and preds.num_rows == NUM_VAL
    tsv = out / "pred.part-0.val.beam2.max22.odlabels.tsv"
    assert len(tsv.read_text(encoding="utf-8").splitlines()) == NUM_VAL
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "tokenization: char" in report and "tokenization: jieba" in report
    assert "![examples](examples.png)" in report
    assert (out / "examples.png").stat().st_size > 10_000


def test_scoring_a_predictions_file_checks_ids_against_references(ray_local, caption_setup, tmp_path):
    data, model_dir, root = caption_setup
    val_ids = [f"val/{i:06d}" for i in range(NUM_VAL)]
    good = tmp_path / "pred.tsv"
    good.write_text("".join(f'{i}\t[{{"caption": "红色的圆形", "conf": 1.0}}]\n' for i in val_ids), encoding="utf-8")
    summary = run_evaluate(_card(data, model_dir, tmp_path / "ok", predictions=str(good), num_examples=0))
    assert summary["metrics"]["char"]["Bleu_1"] > 0
    bad = tmp_path / "bad.tsv"
    lines = [f'{i}\t[{{"caption": "红色"}}]\n' for i in val_ids[2:] + ["val/999999", "train/000000"]]
    bad.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"2 predictions for images without references .* 2 of 12 referenced images"):
        run_evaluate(_card(data, model_dir, tmp_path / "bad", predictions=str(bad)))


def test_references_for_images_without_features_are_an_error(ray_local, caption_setup, tmp_path):
    data, model_dir, _ = caption_setup
    refs = tmp_path / "refs.jsonl"
    rows = [{"image_id": f"val/{i:06d}", "text": "红色的圆形", "kind": "caption", "split": "val"} for i in range(14)]
    refs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    card = _card(data, model_dir, tmp_path / "out")
    card.references = str(refs)
    with pytest.raises(ConfigError, match=r"2 of 14 referenced images have no features"):
        run_evaluate(card)
