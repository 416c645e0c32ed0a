"""Rehearsal on real-format files: tiny files written the way the original code writes them (tsv + base64 float32,
torch.save'd dicts, yaml, AIC json) go through `mengzi-ray import-oscar`, then training on Ray Train (a few steps),
evaluation and the serving engines, with the layouts the model dirs record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from mengzi_ray.cli import main as cli_main
from mengzi_ray.config import load_card, validate_card
from mengzi_ray.evaluation.card import EvaluateCard
from mengzi_ray.evaluation.jobs import run_evaluate
from mengzi_ray.features.schema import region_arrays
from mengzi_ray.serving.captioning import CaptionEngine, CaptionJob, RegionSet
from mengzi_ray.inference import MatchScorer
from mengzi_ray.training.card import CaptionCard, PretrainCard, RetrievalCard
from mengzi_ray.training.jobs import exported_model_uri, run_training
from tests.oscar_originals import (
    make_images,
    write_aic_annotations,
    write_caption_dir,
    write_oscarplus_corpus,
    write_retrieval_dir,
    write_vinvl_features,
)

JOBS = Path(__file__).resolve().parents[2] / "jobs"
FEW_STEPS = ["schedule.max_steps=4", "validation.every_steps=4", "optim.warmup_steps=1", "data.max_val_images=4",
             "batch.global_batch_size=4", "batch.per_worker_batch_size=2"]


def import_card(tmp: Path, name: str, **fields) -> Path:
    path = tmp / "cards" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(fields))
    assert cli_main(["import-oscar", "--config", str(path)]) == 0
    return Path(fields["output"])


def train(cls, card_name: str, tmp: Path, data: Path, *overrides: str) -> str:
    card = load_card(cls, JOBS / card_name, [f"data.features={data}/features", f"data.text={data}/text.jsonl",
                                             f"run.storage_path={tmp}/runs", *FEW_STEPS, *overrides])
    summary = run_training(card, controller_failure_limit=1)
    assert summary["steps"] == 4
    return exported_model_uri(str(tmp / "runs"), card.run.name)


def test_import_train_evaluate_serve_on_original_layouts(ray_local, tmp_path: Path) -> None:
    images = make_images(16, seed=7)
    src = tmp_path / "released"
    # retrieval dir: {train,minival}_captions.pt, one features.tsv + predictions.tsv for all images, keys, top-20
    write_retrieval_dir(src / "coco_ir", "minival", images[12:])
    write_retrieval_dir(src / "coco_ir", "train", images[:12])
    write_vinvl_features(src / "coco_ir", images)
    coco_ir = import_card(tmp_path, "coco_ir", format="vinvl_retrieval", dir=str(src / "coco_ir"), split="minival",
                          more_splits=["train"], output=str(tmp_path / "data" / "coco-ir"), tags="langboat")
    assert json.loads((coco_ir / "import_summary.json").read_text())["failed"] == {}
    # captioning dir: train.yaml + val.yaml; Oscar+ corpus; AIC-ICC annotations (text only)
    write_caption_dir(src / "coco_caption", "train", images[:12])
    write_caption_dir(src / "coco_caption", "val", images[12:])
    caption = import_card(tmp_path, "caption", format="vinvl_caption", yaml=str(src / "coco_caption" / "train.yaml"),
                          more_yamls=[str(src / "coco_caption" / "val.yaml")], output=str(tmp_path / "data" / "cap"))
    corpus = import_card(tmp_path, "corpus", format="oscarplus_corpus",
                         yaml=str(write_oscarplus_corpus(src / "corpus", src / "corpus_feats", images)),
                         data_dir=str(src / "corpus_feats"), output=str(tmp_path / "data" / "pretrain"))
    aic = import_card(tmp_path, "aic", format="aic_icc", split="val", output=str(tmp_path / "data" / "aic"),
                      annotations=str(write_aic_annotations(src / "caption_validation_annotations.json", images)))
    assert len((aic / "text.jsonl").read_text().splitlines()) == 16 * 5

    # training: a few steps each, on what the importers wrote
    pretrained = train(PretrainCard, "pretrain_tiny.yaml", tmp_path, corpus, "data.val_split=train", "data.kind=all")
    retriever = train(RetrievalCard, "retrieval_tiny.yaml", tmp_path, coco_ir, "data.val_split=minival",
                      "retrieval.max_img_seq_length=70", "retrieval.val_captions_per_image=5")
    captioner = train(CaptionCard, "caption_tiny.yaml", tmp_path, caption, "caption.max_img_seq_length=6")
    assert Path(pretrained, "config.json").is_file()

    # evaluation: the retrieval model's recorded layout (70 regions) and the import's eval key list
    card = validate_card(EvaluateCard, {
        "task": "retrieval", "model_dir": retriever, "features": str(coco_ir / "features"),
        "references": str(coco_ir / "text.jsonl"), "split": "minival", "output_dir": str(tmp_path / "eval_ir"),
        "actors": {"num_actors": 1, "batch_size": 8},
        "retrieval": {"image_keys": str(coco_ir / "eval_image_keys.txt"), "captions_per_image": 5,
                      "chunk_size": 64}}, "rehearsal")
    metrics = run_evaluate(card)
    assert metrics["model_layout"]["max_img_seq_length"] == 70 and metrics["num_images"] == 4
    assert all(0 <= metrics["metrics"][f"{d}_R@{k}"] <= 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    card = validate_card(EvaluateCard, {
        "task": "caption", "model_dir": captioner, "features": str(caption / "features"),
        "references": str(caption / "references_val.json"), "output_dir": str(tmp_path / "eval_cap"),
        "actors": {"num_actors": 1, "batch_size": 4},
        "caption": {"num_beams": 1, "max_gen_length": 8, "tokenizations": ["char", "aic_icc"], "num_examples": 0}},
        "rehearsal")
    metrics = run_evaluate(card)
    assert metrics["num_images"] == 4 and "CIDEr" in metrics["metrics"]["char"]
    assert "aic_icc" in metrics["metrics"] or "empty prediction" in metrics["rejected"]["aic_icc"]

    # serving engines over the imported features, with the layouts the dirs record
    table = pq.read_table(coco_ir / "features")
    regions = [RegionSet(np.array(f), tags) for f, tags in zip(region_arrays(table.column("features")),
                                                               table.column("tags").to_pylist())]
    encoder = MatchScorer.from_model_dir(str(retriever), "cpu")
    assert encoder.tensorizer.layout.max_img_seq_length == 70
    scores = encoder.score([("第1张图的第0句描述。", encoder.od_labels(r.labels, r.tags), r.features) for r in regions[:3]])
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    engine = CaptionEngine.from_model_dir(str(captioner), max_gen_length=8, device="cpu")
    result = engine.caption([CaptionJob(regions[0], num_beams=2, top_n=1)])[0]
    assert result.regions_used == min(6, len(regions[0].tags)) and len(result.captions) == 1
