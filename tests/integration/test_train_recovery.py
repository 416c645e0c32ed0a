"""Recovery: a worker raises mid-run → Ray Train restores every worker from the last checkpoint and the run ends
with exactly the configured number of optimizer steps, continuing (not restarting) the loss curve; re-submitting
the same run name with more steps resumes from its last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mengzi_ray.config import load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.jobs import run_training
from mengzi_ray.training.loop import FAULT_MARKER, STATE_FILE

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_worker_failure_restores_and_resubmit_resumes(ray_local, tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "syn", num_train=40, num_val=4).root
    base = [
        f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={tmp_path}/runs",
        "run.name=drill", "run.max_failures=1", "data.max_val_images=4", "caption.num_beams=1",
        "optim.warmup_steps=2", "validation.every_steps=4", "checkpoint.num_to_keep=1",
    ]
    card = load_card(CaptionCard, JOBS / "caption_tiny.yaml", base + ["schedule.max_steps=12", "fault_drill={at_step: 6, rank: 1}"])
    summary = run_training(card, controller_failure_limit=1)
    run = tmp_path / "runs" / "drill"
    assert (run / FAULT_MARKER).read_text().startswith("rank 1 raised at step 6")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(h["step"], h["resumed_from"]) for h in history] == [(4, 0), (8, 4), (12, 4)]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # continues from step 4, not from scratch
    assert summary["steps"] == 12
    checkpoints = sorted((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    state = torch.load(checkpoints[-1] / STATE_FILE, weights_only=True)
    assert state["step"] == 12
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {12}  # AdamW stepped exactly 12 times
    assert {p.name for p in checkpoints[-1].glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}  # every rank's RNG
    assert (run / "model" / "_COMPLETE").is_file() and json.loads((run / "summary.json").read_text())["steps"] == 12

    again = load_card(CaptionCard, JOBS / "caption_tiny.yaml", base + ["schedule.max_steps=16"])
    summary = run_training(again, controller_failure_limit=1)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(h["step"], h["resumed_from"]) for h in history][-2:] == [(12, 4), (16, 12)]
    assert summary["steps"] == 16
