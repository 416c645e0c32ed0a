"""Training cards fail before any worker starts, naming the field: unknown keys, impossible batches, missing
datasets, features of the wrong dim, a metric the task does not report."""

from __future__ import annotations

from pathlib import Path

import pytest

from mengzi_ray.config import ConfigError, load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.training.card import CaptionCard, PretrainCard, RetrievalCard
from mengzi_ray.training.jobs import build_trainer

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=8, num_val=4).root


def card(tmp_path: Path, data: Path, *overrides: str, cls=CaptionCard, name: str = "caption_tiny.yaml"):
    base = [f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={tmp_path}"]
    return load_card(cls, JOBS / name, base + list(overrides))


@pytest.mark.parametrize(
    ("cls", "name"),
    [(CaptionCard, "caption_aic.yaml"), (CaptionCard, "caption_coco.yaml"), (CaptionCard, "caption_scst.yaml"),
     (CaptionCard, "caption_tiny.yaml"), (RetrievalCard, "retrieval_coco.yaml"), (RetrievalCard, "retrieval_tiny.yaml"),
     (PretrainCard, "pretrain_base.yaml"), (PretrainCard, "pretrain_tiny.yaml")],
)
def test_every_shipped_card_validates(cls, name: str) -> None:
    loaded = load_card(cls, JOBS / name)
    assert loaded.accumulation_steps >= 1 and loaded.checkpoint.metric in loaded.metric_names()


def test_original_hyper_parameters_are_in_the_cards() -> None:
    aic = load_card(CaptionCard, JOBS / "caption_aic.yaml")
    assert (aic.optim.learning_rate, aic.batch.global_batch_size, aic.scaling.num_workers) == (3e-5, 1024, 8)
    assert (aic.caption.label_smoothing, aic.caption.drop_worst_ratio, aic.caption.drop_worst_after) == (0.1, 0.2, 20000)
    assert aic.caption.tie_weights and aic.caption.freeze_embedding and aic.caption.add_od_labels
    pre = load_card(PretrainCard, JOBS / "pretrain_base.yaml")
    assert (pre.optim.learning_rate, pre.batch.global_batch_size, pre.optim.max_grad_norm) == (1e-4, 1024, 10.0)
    assert (pre.pretrain.max_seq_length, pre.pretrain.max_img_seq_length, pre.pretrain.texta_false_prob) == (35, 50, 0.25)
    ret = load_card(RetrievalCard, JOBS / "retrieval_coco.yaml")
    assert (ret.optim.learning_rate, ret.retrieval.max_seq_length, ret.retrieval.max_img_seq_length) == (2e-5, 70, 70)


def test_unknown_key_is_named(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.learning_rte"):
        card(tmp_path, data, "optim.learning_rte=0.1")


def test_batch_not_divisible_is_named(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ConfigError, match=r"batch\.global_batch_size 30 is not divisible"):
        card(tmp_path, data, "batch.global_batch_size=30")


def test_checkpoint_metric_must_be_reported(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.metric 'val_rsum'"):
        card(tmp_path, data, "checkpoint.metric=val_rsum")


def test_checkpoint_mode_follows_the_metric_and_a_contradiction_is_refused(tmp_path: Path, data: Path) -> None:
    assert card(tmp_path, data, "checkpoint.mode=null").checkpoint.mode == "max"  # val_cider: higher is better
    loss = card(tmp_path, data, "checkpoint.metric=val_loss", "checkpoint.mode=null")
    assert loss.checkpoint.mode == "min"
    with pytest.raises(ConfigError, match=r"checkpoint.mode 'max' contradicts checkpoint.metric 'val_loss'.*worst"):
        card(tmp_path, data, "checkpoint.metric=val_loss")  # the card says mode: max


def test_duplicate_keys_credentials_and_endless_retries_are_card_errors(tmp_path: Path, data: Path) -> None:
    text = (JOBS / "caption_tiny.yaml").read_text(encoding="utf-8")
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "\noptim:\n  learning_rate: 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: .*duplicate key 'optim'"):
        load_card(CaptionCard, twice)
    secret = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/features"
    with pytest.raises(ConfigError, match=r"data.features: a URI with credentials in it") as refused:
        card(tmp_path, data, f"data.features={secret}")
    assert "wJalrXUtnFEMI" not in str(refused.value)  # the message never repeats the secret
    with pytest.raises(ConfigError, match=r"max_failures: -1 retries forever"):
        card(tmp_path, data, "run.max_failures=-1")
    assert card(tmp_path, data, "run.max_failures=-1", "run.allow_infinite_retries=true").run.max_failures == -1


def test_missing_dataset_fails_before_workers(tmp_path: Path, data: Path) -> None:
    bad = card(tmp_path, data, f"data.features={tmp_path}/nowhere")
    with pytest.raises(ConfigError, match=r"data\.features: .*nowhere does not exist"):
        build_trainer(bad)  # no Ray is running: the check comes first
    assert not (tmp_path / "caption-tiny").exists()


def test_wrong_feature_dim_fails_before_workers(tmp_path: Path, data: Path) -> None:
    bad = card(tmp_path, data, "model.img_feature_dim=2048")
    with pytest.raises(ConfigError, match=r"data\.features: regions are 2054-d but model\.img_feature_dim is 2048"):
        build_trainer(bad)


def test_missing_split_and_init_dir_are_named(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.val_split: no caption rows of split 'test'"):
        build_trainer(card(tmp_path, data, "data.val_split=test"))
    with pytest.raises(ConfigError, match=r"model\.init_from: .* is not a model dir"):
        build_trainer(card(tmp_path, data, "model.tiny=null", f"model.init_from={tmp_path}"))
