"""The one model export (`training.jobs.export_model`), used by a finished run and by a sweep's best trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mengzi_ray.config import load_card
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.jobs import MODEL_FILES, export_model
from mengzi_ray.training.loop import HISTORY_FILE
from tests.conftest import CAPTION_CARD_YAML


@pytest.fixture
def card(tmp_path: Path) -> CaptionCard:
    path = tmp_path / "caption.yaml"
    path.write_text(CAPTION_CARD_YAML)
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
