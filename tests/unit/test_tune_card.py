"""Tune cards: bad search spaces, metrics and batch choices fail before any trial, naming the field (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mengzi_ray.config import ConfigError, load_card
from mengzi_ray.training.card import CaptionCard, metric_mode
from mengzi_ray.training.tune import run_tune, trial_run_name
from mengzi_ray.training.tune_card import TuneCard, load_training_card, trial_card
from mengzi_ray.training.tune_checks import check_capacity, check_sweep
from tests.conftest import CAPTION_CARD_YAML


def tune_yaml(training_path, **sections: str) -> str:
    parts = {
        "training": f"{{task: caption, card: {training_path}}}",
        "search": "{learning_rate: {min: 1.0e-5, max: 1.0e-3}, num_samples: 4}",
        "scheduler": "{metric: val_cider}",
        "run": "{name: sweep, storage_path: /tmp/unused}",
    }
    parts.update(sections)
    return "".join(f"{key}: {value}\n" for key, value in parts.items())


@pytest.fixture()
def training_path(tmp_path):
    path = tmp_path / "caption.yaml"
    path.write_text(CAPTION_CARD_YAML, encoding="utf-8")
    return path


def load(tmp_path, training_path, **sections: str) -> TuneCard:
    path = tmp_path / "tune.yaml"
    path.write_text(tune_yaml(training_path, **sections), encoding="utf-8")
    return load_card(TuneCard, path)


def test_valid_card_loads_its_training_card(tmp_path, training_path):
    card = load(tmp_path, training_path, search="{learning_rate: {min: 1.0e-5, max: 1.0e-3}, warmup_steps: [0, 5]}")
    training = load_training_card(card.training)
    assert isinstance(training, CaptionCard) and training.optim.learning_rate == 1e-4
    check_sweep(card, training)
    assert card.scheduler.mode == "max" and card.search.num_samples == 8 and card.resources.driver_cpus == 0.1
    assert len(card.search.corner_points()) == 4  # 2 lr ends × 2 warmup choices


@pytest.mark.parametrize(
    ("search", "problem"),
    [
        ("{learning_rate: {min: 1.0e-4, max: 1.0e-4}}", "empty range"),
        ("{learning_rate: {min: 1.0e-3, max: 1.0e-5}}", "inverted range"),
        ("{learning_rate: {min: 0, max: 1.0e-5}}", "search.learning_rate.min"),
        ("{learning_rate: {min: 1.0e-5, max: 1.0e-3}, warmup_steps: []}", "search.warmup_steps"),
        ("{learning_rate: {min: 1.0e-5, max: 1.0e-3}, global_batch_size: [8, 8]}", "repeat a value"),
        ("{learning_rate: {min: 1.0e-5, max: 1.0e-3}, num_samples: 0}", "search.num_samples"),
        ("{learning_rate: {min: 1.0e-5, max: 1.0e-3}, lr_decay: 0.9}", "search.lr_decay"),
    ],
)
def test_bad_search_space_fails_at_load(tmp_path, training_path, search, problem):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, training_path, search=search)
    assert problem in str(info.value) and "tune.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"scheduler": "{metric: val_rsum}"}, "scheduler.metric 'val_rsum' is not reported by caption"),
        ({"scheduler": "{metric: train_loss}"}, "scheduler.metric 'train_loss' is not reported"),
        ({"scheduler": "{metric: val_cider, grace_period_steps: 50}"}, "grace_period_steps 50 > the card's"),
        (
            {"search": "{learning_rate: {min: 1.0e-5, max: 1.0e-3}, global_batch_size: [16, 12]}"},
            "search point {'learning_rate': 1e-05, 'global_batch_size': 12}",
        ),
        (
            {"search": "{learning_rate: {min: 1.0e-5, max: 1.0e-3}, warmup_steps: [0, 100]}"},
            "optim.warmup_steps 100 > schedule.max_steps 40",
        ),
    ],
)
def test_sweep_that_cannot_run_fails_before_any_trial(tmp_path, training_path, sections, problem):
    card = load(tmp_path, training_path, **sections)
    with pytest.raises(ConfigError) as info:
        check_sweep(card, load_training_card(card.training))
    assert problem in str(info.value) and str(training_path) in str(info.value)


def test_training_card_problems_name_that_file(tmp_path, training_path):
    card = load(tmp_path, training_path, training=f"{{task: caption, card: {tmp_path}/missing.yaml}}")
    with pytest.raises(ConfigError, match="missing.yaml: job card not found"):
        load_training_card(card.training)
    overrides = f"{{task: caption, card: {training_path}, overrides: ['batch.per_worker_batch_size=3']}}"
    card = load(tmp_path, training_path, training=overrides)
    with pytest.raises(ConfigError, match="not divisible"):
        load_training_card(card.training)
    with pytest.raises(ConfigError, match="task"):
        load(tmp_path, training_path, training=f"{{task: vqa, card: {training_path}}}")


def test_trial_card_sets_the_sampled_fields(tmp_path, training_path):
    card = load(tmp_path, training_path)
    base = load_training_card(card.training).model_dump()
    trial = trial_card("caption", base, {"learning_rate": 3e-5, "warmup_steps": 5, "global_batch_size": 8})
    assert (trial.optim.learning_rate, trial.optim.warmup_steps, trial.batch.global_batch_size) == (3e-5, 5, 8)
    assert trial.accumulation_steps == 1 and trial.schedule.max_steps == 40
    with pytest.raises(ConfigError, match="unknown swept parameter 'momentum'"):
        trial_card("caption", base, {"momentum": 0.9})


def test_capacity_check(tmp_path, training_path):
    card = load(tmp_path, training_path, resources="{max_concurrent_trials: 2, driver_cpus: 0.1}")
    training = load_training_card(card.training)  # 2 workers × 1 CPU + 0.1 per trial
    check_capacity(card, training, cluster_cpus=4.2, embedded=True)
    with pytest.raises(ConfigError, match=r"max_concurrent_trials 2 × 2.1 CPUs .* = 4.2 > the cluster's 4 CPUs"):
        check_capacity(card, training, cluster_cpus=4, embedded=True)
    check_capacity(card, training, cluster_cpus=4, embedded=False)  # an autoscaling cluster may grow: warning only


def test_modes_and_names():
    assert [metric_mode(m) for m in ("val_loss", "val_cider", "val_i2t_R@1", "val_rsum")] == ["min", "max", "max", "max"]
    assert trial_run_name("lr-sweep", "ab12c_00003") == "lr-sweep-ab12c_00003"


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tune_tiny", "tune_caption_lr", "tune_retrieval_lr"])
def test_shipped_cards_validate(name, monkeypatch):
    monkeypatch.chdir(REPO)  # cards name their training card relative to the project root
    card = load_card(TuneCard, REPO / "jobs" / f"{name}.yaml")
    assert card.search.learning_rate.min < card.search.learning_rate.max
    if Path(card.training.card).exists():  # the full-size training cards ship with the training stage
        check_sweep(card, load_training_card(card.training))
    else:
        assert name != "tune_tiny"


def test_tiny_card_runs_a_tiny_sweep(monkeypatch):
    monkeypatch.chdir(REPO)
    card = load_card(TuneCard, REPO / "jobs/tune_tiny.yaml")
    training = load_training_card(card.training)
    assert card.search.num_samples == 4 and training.schedule.max_steps == 40
    check_capacity(card, training, cluster_cpus=card.ray.num_cpus, embedded=True)


@pytest.mark.parametrize(
    "sections",
    [
        {"scheduler": "{metric: val_mlm_acc}"},
        {"search": "{learning_rate: {min: 1.0e-5, max: 1.0e-3}, global_batch_size: [12]}"},
    ],
)
def test_run_tune_refuses_before_starting_ray_or_writing(tmp_path, training_path, sections, monkeypatch):
    # Another test in the same process may have left a Ray running, so watch the call, not ray.is_initialized().
    started = []
    monkeypatch.setattr("mengzi_ray.ray_runtime.ensure_ray", lambda section: started.append(section))
    storage = tmp_path / "sweeps"
    card = load(tmp_path, training_path, run=f"{{name: sweep, storage_path: {storage}}}", **sections)
    with pytest.raises(ConfigError):
        run_tune(card)
    assert not storage.exists() and started == []
