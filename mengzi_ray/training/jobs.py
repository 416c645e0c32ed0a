"""Training jobs on Ray Train: card → checked inputs → TorchTrainer → fit → exported model dir + metrics.

`build_trainer` is also the entry for tuning (E5 builds one trainer per trial with its own run name, storage and
callbacks). Layout of a run under `<storage_path>/<run name>/` (local or s3://):

    init/                 the model dir training starts from (tiny cards: random init + vocab built from data)
    checkpoint_*/         Ray Train checkpoints (K best by checkpoint.metric + the latest); see loop.py
    metrics.jsonl, loss.png, validation.png, summary.json
    model/                the exported final model: config.json + model.safetensors + vocab.txt + training_card.json
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mengzi_ray import storage
from mengzi_ray.config import ConfigError, JobFailed
from mengzi_ray.modeling import OscarConfig
from mengzi_ray.ray_runtime import ensure_ray
from mengzi_ray.text import build_vocab, load_tokenizer, tag_string, write_vocab
from mengzi_ray.training.card import CaptionCard, PretrainCard, RetrievalCard, TrainCard
from mengzi_ray.training.examples import check_data, joined_dataset, read_text_table
from mengzi_ray.training.loop import HISTORY_FILE, train_loop_per_worker
from mengzi_ray.training.report import training_card, write_metrics
from mengzi_ray.training.tasks import task_for

log = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt")
PREPARE_ROWS = 64
"""Joined rows per call of a task's upstream example builder (a few micro-batches: its output streams early)."""


def run_dir_uri(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def exported_model_uri(storage_path: str, name: str) -> str:
    """Where a finished run's model dir is: `<storage_path>/<name>/model`."""
    return f"{run_dir_uri(storage_path, name)}/model"


def check_inputs(card: TrainCard) -> None:
    """Everything that can be checked before a worker starts (raises ConfigError naming the field)."""
    for field in ("init_from", "from_bert"):
        uri = getattr(card.model, field)
        if uri is not None:
            fs, path = storage.filesystem_for(uri)
            if fs.get_file_info(f"{path}/vocab.txt").type.name == "NotFound":
                raise ConfigError(f"model.{field}: {uri} is not a model dir (no vocab.txt)")
    splits = {"data.train_split": card.data.train_split, "data.val_split": card.data.val_split}
    check_data(card.data.features, card.data.text, splits, card.data.kind, card.model.img_feature_dim)


def prepare_init(card: TrainCard, run_dir: str) -> tuple[str, bool]:
    """(model dir the workers start from, whether it is a BERT dir). Tiny cards get `<run>/init` written once
    (random init seeded by model.tiny.seed, vocab from the train texts and tags), so a resumed run reuses it."""
    if card.model.init_from:
        return storage.absolute(card.model.init_from), False
    if card.model.from_bert:
        return storage.absolute(card.model.from_bert), True
    init_uri = f"{run_dir}/init"
    fs, path = storage.filesystem_for(f"{init_uri}/{storage.COMPLETE_MARKER}")
    if fs.get_file_info(path).type.name != "NotFound":
        return init_uri, False
    import pyarrow.parquet as pq

    table = read_text_table(card.data.text, card.data.train_split, card.data.kind)
    texts = table.column("text").to_pylist()
    if "text_b" in table.column_names:  # QA answers are text too
        texts += [b for b in table.column("text_b").to_pylist() if b]
    feat_fs, feat_path = storage.filesystem_for(card.data.features)
    tags = pq.ParquetDataset(feat_path, filesystem=feat_fs).read(columns=["tags"]).column("tags").to_pylist()
    tiny = card.model.tiny
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "init"
        write_vocab(build_vocab(texts + [tag_string(t or []) for t in tags]), local / "vocab.txt")
        task = task_for(card, load_tokenizer(local))
        config = OscarConfig(
            vocab_size=len(task.tokenizer), hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_hidden_layers,
            num_attention_heads=tiny.num_attention_heads, intermediate_size=tiny.intermediate_size,
            max_position_embeddings=128, **task.config_overrides(),
        )
        torch.manual_seed(tiny.seed)
        task.model_class(config).save_pretrained(local, vocab_file=local / "vocab.txt")
        storage.publish_dir(local, init_uri)
    return init_uri, False


def build_trainer(
    card: TrainCard,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: Sequence[Any] = (),
    controller_failure_limit: int = -1,
) -> Any:
    """A TorchTrainer for `card` (inputs checked first; ConfigError before any worker starts).

    run_name / storage_path default to the card's run section; `callbacks` are ray.train.UserCallbacks (Tune's
    TuneReportCallback). `controller_failure_limit` > 0 makes worker-group scheduling failures fatal (tests)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    check_inputs(card)
    name = run_name or card.run.name
    fs_root = storage.absolute(storage_path or card.run.storage_path)
    run_dir = run_dir_uri(fs_root, name)
    init_dir, from_bert = prepare_init(card, run_dir)
    task = task_for(card, load_tokenizer(storage.download_dir(init_dir)))
    train_texts = read_text_table(card.data.text, card.data.train_split, card.data.kind)
    val_texts = read_text_table(card.data.text, card.data.val_split, card.data.kind)
    train = joined_dataset(card.data.features, train_texts, per_image=task.per_image_train).randomize_block_order(
        seed=card.optim.seed
    )
    upstream = task.upstream()
    if upstream is not None:  # after the block-order barrier, so example building streams alongside training
        build, kwargs = upstream
        train = train.map_batches(build, batch_size=PREPARE_ROWS, batch_format="pyarrow", zero_copy_batch=True, fn_kwargs=kwargs)
    datasets = {
        "train": train,
        "val": joined_dataset(card.data.features, val_texts, per_image=True, limit=card.data.max_val_images),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"card": card, "init_dir": init_dir, "from_bert": from_bert, "run_dir": run_dir},
        scaling_config=card.scaling.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=fs_root,
            failure_config=ray.train.FailureConfig(
                max_failures=card.run.max_failures, controller_failure_limit=controller_failure_limit
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=card.checkpoint.num_to_keep,
                checkpoint_score_attribute=card.checkpoint.metric,
                checkpoint_score_order=card.checkpoint.mode,
            ),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=_ordered_ingest()),
    )


def _ordered_ingest() -> Any:
    """Ray Train's ingest options with the output order kept: with the seeded block order and local shuffle, an
    epoch's batches then come in the same order when a resumed run replays it (training/loop.py micro_batches)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def read_history(checkpoint: Path) -> list[dict[str, Any]]:
    """The validation history rank 0 keeps in every checkpoint (one dict per validation, oldest first)."""
    return json.loads((checkpoint / HISTORY_FILE).read_text(encoding="utf-8"))


def export_model(checkpoint: Path, destination: str, card: TrainCard, run_name: str, best: dict[str, Any] | None) -> str:
    """Publish the model dir of a local Train checkpoint at `destination` (local or s3://) and return its URI.

    The dir holds MODEL_FILES and a training_card.json (`report.training_card`: the card that trained it, the
    checkpoint's last metrics, `best` = {"path", "metric"} of the checkpoint chosen, the commit). The one export
    path: a finished run (`run_training`) and a sweep's best trial (`tune.run_tune`) both call it."""
    history = read_history(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        for name in MODEL_FILES:
            shutil.copyfile(checkpoint / name, model_dir / name)
        card_json = training_card(card, run_name, history, best)
        (model_dir / "training_card.json").write_text(json.dumps(card_json, indent=2, ensure_ascii=False), encoding="utf-8")
        return storage.publish_dir(model_dir, destination)


def run_training(card: TrainCard, *, controller_failure_limit: int = -1) -> dict[str, Any]:
    """Fit, then export the final model dir, metrics.jsonl, plots and summary.json; returns the summary."""
    ensure_ray(card.ray)
    trainer = build_trainer(card, controller_failure_limit=controller_failure_limit)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray raises TrainingFailedError subclasses once restarts are exhausted
        raise JobFailed(f"run {card.run.name}: training failed: {e}") from e
    if result.checkpoint is None:
        raise JobFailed(f"run {card.run.name}: finished without a checkpoint")
    run_dir = run_dir_uri(card.run.storage_path, card.run.name)
    best = result.get_best_checkpoint(card.checkpoint.metric, card.checkpoint.mode)
    best_info = {"path": best.path, "metric": card.checkpoint.metric} if best is not None else None
    with result.checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory() as tmp:
        history = read_history(Path(ckpt))
        report_dir = Path(tmp) / "report"
        written = write_metrics(history, report_dir)
        summary = {
            "task": card.task,
            "run_name": card.run.name,
            "run_dir": run_dir,
            "model_dir": exported_model_uri(card.run.storage_path, card.run.name),
            "steps": history[-1]["step"] if history else 0,
            "final_metrics": history[-1] if history else {},
            "best_checkpoint": best_info,
            "outputs": [f"{run_dir}/{p.name}" for p in written],
        }
        # the model first, summary.json last: a summary that exists always names a whole model
        export_model(Path(ckpt), summary["model_dir"], card, card.run.name, best_info)
        storage.upload_dir(report_dir, run_dir)
        storage.write_json(f"{run_dir}/summary.json", summary)
    log.info("run %s: %s", card.run.name, summary["final_metrics"])
    return summary


def _run_task(card: TrainCard, expected: type[TrainCard]) -> dict[str, Any]:
    if not isinstance(card, expected):
        raise ConfigError(f"this command takes a {expected.__name__}, got {type(card).__name__}")
    return run_training(card)


def run_pretrain(card: PretrainCard) -> dict[str, Any]:
    return _run_task(card, PretrainCard)


def run_finetune_caption(card: CaptionCard) -> dict[str, Any]:
    return _run_task(card, CaptionCard)


def run_finetune_retrieval(card: RetrievalCard) -> dict[str, Any]:
    return _run_task(card, RetrievalCard)
