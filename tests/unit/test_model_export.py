"""The one model export (`training.jobs.export_model`), used by a finished run and by a sweep's best trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mengzi_ray.config import load_card
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.jobs import MODEL_FILES, export_model
from mengzi_ray.training.loop import HISTORY_FILE

CARD = """\
run: {name: cap, storage_path: /tmp/unused}
data: {features: /tmp/f, text: /tmp/t.jsonl}
model: {tiny: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}
optim: {learning_rate: 1.0e-4}
batch: {global_batch_size: 4, per_worker_batch_size: 4}
schedule: {max_steps: 10}
validation: {every_steps: 5}
checkpoint: {metric: val_cider}
"""


@pytest.fixture
def card(tmp_path: Path) -> CaptionCard:
    path = tmp_path / "caption.yaml"
    path.write_text(CARD)
    return load_card(CaptionCard, path)


def checkpoint(root: Path, history: list[dict]) -> Path:
    ckpt = root / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    for name in MODEL_FILES:
        (ckpt / name).write_bytes(f"contents of {name}".encode())
    (ckpt / "optimizer.pt").write_bytes(b"training state, not part of a model dir")
    (ckpt / HISTORY_FILE).write_text(json.dumps(history))
    return ckpt


def test_export_writes_the_model_files_and_the_training_card(tmp_path: Path, card: CaptionCard) -> None:
    history = [{"step": 5, "val_cider": 0.1}, {"step": 10, "val_cider": 0.3}]
    ckpt = checkpoint(tmp_path / "run", history)
    best = {"path": str(ckpt), "metric": "val_cider"}
    uri = export_model(ckpt, str(tmp_path / "out" / "model"), card, "cap-trial1", best)
    model = Path(uri)
    for name in MODEL_FILES:
        assert (model / name).read_bytes() == (ckpt / name).read_bytes()
    assert not (model / "optimizer.pt").exists() and not (model / HISTORY_FILE).exists()
    written = json.loads((model / "training_card.json").read_text(encoding="utf-8"))
    assert written["task"] == "caption" and written["run_name"] == "cap-trial1"
    assert written["final_metrics"] == history[-1] and written["best_checkpoint"] == best
    assert written["job_card"]["optim"]["learning_rate"] == 1.0e-4


def test_incomplete_checkpoint_publishes_nothing(tmp_path: Path, card: CaptionCard) -> None:
    ckpt = checkpoint(tmp_path / "run", [])
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export_model(ckpt, str(tmp_path / "out" / "model"), card, "cap", None)
    assert not (tmp_path / "out" / "model").exists()
