"""One input layout from training to every consumer: a retrieval model trained on Ray Train at a non-default text
length (24) and attention mask (CL) records both in its dir, and the evaluate job, Serve's Retriever replica
class and a direct `MatchScorer` give it bit-identical scores; a card that contradicts the dir is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mengzi_ray.config import ConfigError, load_card, validate_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.evaluation.card import EvaluateCard
from mengzi_ray.evaluation.feature_io import feature_ids, load_regions
from mengzi_ray.evaluation.jobs import run_evaluate
from mengzi_ray.inference import MatchScorer
from mengzi_ray.serving.deployments import Retriever
from mengzi_ray.serving.retrieval import SearchQuery
from mengzi_ray.serving.settings import RetrieverSection
from mengzi_ray.training.card import RetrievalCard
from mengzi_ray.training.jobs import exported_model_uri, run_training

JOBS = Path(__file__).resolve().parents[2] / "jobs"
TEXT_LENGTH, MASK = 24, "CL"


def val_texts(text_path: Path, image_ids: list[str]) -> dict[str, str]:
    """image_id → its first val caption, for those of `image_ids` that have one."""
    first: dict[str, str] = {}
    wanted = set(image_ids)
    for line in text_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["split"] == "val" and row["kind"] == "caption" and row["image_id"] in wanted:
            first.setdefault(row["image_id"], row["text"])
    return first


def test_trained_layout_gives_identical_scores_in_evaluation_serve_and_match_scorer(ray_local, tmp_path: Path) -> None:
    ds = write_synthetic_dataset(tmp_path / "syn", num_train=40, num_val=4)
    card = load_card(RetrievalCard, JOBS / "retrieval_tiny.yaml", [
        f"data.features={ds.root}/features", f"data.text={ds.text_path}", f"run.storage_path={tmp_path}/runs",
        "scaling.num_workers=1", "data.max_val_images=4", "schedule.max_steps=6", "validation.every_steps=6",
        "optim.warmup_steps=2", "batch.global_batch_size=8", "batch.per_worker_batch_size=8",
        f"retrieval.max_seq_length={TEXT_LENGTH}", f"retrieval.att_mask_type={MASK}",
    ])
    run_training(card, controller_failure_limit=1)
    model_dir = exported_model_uri(str(tmp_path / "runs"), card.run.name)
    recorded = json.loads((Path(model_dir) / "config.json").read_text())
    assert (recorded["max_seq_length"], recorded["att_mask_type"], recorded["max_img_seq_length"]) == (TEXT_LENGTH, MASK, 5)

    # evaluation: every val image × its first caption (k = 1), pair batches of 1
    eval_card = {"task": "retrieval", "model_dir": model_dir, "features": str(ds.features_path),
                 "references": str(ds.text_path), "split": "val", "output_dir": str(tmp_path / "eval"),
                 "actors": {"num_actors": 1, "batch_size": 1},
                 "retrieval": {"captions_per_image": 1, "chunk_size": 4, "ks": [1]}}
    summary = run_evaluate(validate_card(EvaluateCard, eval_card, "eval"))
    assert summary["model_layout"]["max_seq_length"] == TEXT_LENGTH and summary["model_layout"]["att_mask_type"] == MASK
    evaluated = np.load(tmp_path / "eval" / "scores.npy")  # (images, texts)
    # the evaluated gallery: the val images in feature order, each with its first caption
    texts = val_texts(ds.text_path, feature_ids(str(ds.features_path)))
    ids = [i for i in feature_ids(str(ds.features_path)) if i in texts]
    assert evaluated.shape == (len(ids), len(ids)) == (4, 4)
    regions = load_regions(str(ds.features_path), ids)

    # a direct MatchScorer call with the dir's layout
    scorer = MatchScorer.from_model_dir(model_dir, "cpu", batch_size=1)
    assert scorer.tensorizer.layout.max_seq_length == TEXT_LENGTH and scorer.tensorizer.layout.att_mask_type == MASK
    direct = scorer.score([(texts[t], regions[i][1], regions[i][0]) for i in ids for t in ids]).reshape(len(ids), len(ids))
    np.testing.assert_array_equal(direct, evaluated)

    # Serve's Retriever deployment: brute-force image search for each caption, through a deployment handle
    from ray import serve

    section = RetrieverSection(model_dir=model_dir, gallery={"features": str(ds.features_path), "texts": str(ds.text_path),
                                                            "split": "val"}, candidates=100, rerank_chunk=1, num_cpus=0.5)
    try:
        handle = serve.run(Retriever.options(**section.deployment_options()).bind(section), name="layout",
                           route_prefix=None)
        assert handle.info.remote().result()["input_layout"]["att_mask_type"] == MASK
        answers = [handle.search.remote(SearchQuery(k=len(ids), text=texts[t])) for t in ids]
        served = np.full_like(evaluated, np.nan)
        for column, answer in enumerate(answers):
            for row in answer.result():
                served[ids.index(row["image_id"]), column] = row["score"]
    finally:
        serve.shutdown()
    np.testing.assert_array_equal(served, evaluated)

    # the layout matters: the default text length and mask give other scores for the same pairs
    default = MatchScorer.from_model_dir(model_dir, "cpu", batch_size=1,
                                         config_overrides={"max_seq_length": 70, "att_mask_type": "CLR"})
    wrong = default.score([(texts[t], regions[i][1], regions[i][0]) for i in ids for t in ids]).reshape(len(ids), len(ids))
    assert not np.array_equal(wrong, evaluated)

    # a card that contradicts the dir is refused, the field named
    with pytest.raises(ConfigError, match=f"retrieval.att_mask_type: the card says CLR but model dir .* records {MASK}"):
        run_evaluate(validate_card(EvaluateCard, {**eval_card, "retrieval": {**eval_card["retrieval"], "att_mask_type": "CLR"}}, "eval"))
    with pytest.raises(ConfigError, match=f"model_layout.max_seq_length: the card says 70 but model dir .* records {TEXT_LENGTH}"):
        run_evaluate(validate_card(EvaluateCard, {**eval_card, "model_layout": {"max_seq_length": 70}}, "eval"))
