"""Learning-rate sweeps: Ray Tune drives one Ray Train run per trial, ASHA stops the weak ones early.

`mengzi-ray tune --config jobs/tune_caption_lr.yaml` → `run_tune(card)`. The tune card names a training card (any
task) and the search space; every trial is that training card with the sampled `optim.learning_rate` (and, if the
card asks, `optim.warmup_steps` / `batch.global_batch_size`), run by a Tune *function trainable* that builds and
fits its own `TorchTrainer` (`training.jobs.build_trainer`) with `TuneReportCallback`: Train V2 does not accept
`Tuner(trainer)`. ASHA's time axis is the training `step` each validation reports, so rungs are in optimiser steps
and survive a trial restarting from its Train checkpoint.

Layout under `<run.storage_path>/<run.name>/` (local or s3://): Tune's experiment state and trial dirs,
`runs/<name>-<trial id>/` (each trial's Train run and its checkpoints, ranked by the swept metric),
`sweep_card.json` (what was swept, to refuse resuming a different sweep), `results.csv|parquet`, `sweep.png`,
`best_model/` (the best trial's checkpoint of its best reported value, as a model dir), `summary.json`. Re-running an interrupted sweep restores it (`Tuner.restore`): finished trials are kept, unfinished
ones continue from their Train checkpoints.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs
from pydantic import Field, model_validator

from mengzi_ray.config import (
    COMMANDS,
    Card,
    ConfigError,
    JobFailed,
    RaySection,
    RunSection,
    Section,
    apply_overrides,
    load_card,
    validate_card,
)
from mengzi_ray.storage import download_dir, filesystem_for, is_remote, publish_dir, write_json
from mengzi_ray.training.card import metric_mode
from mengzi_ray.training.tune_results import (
    TrialRecord,
    best_row,
    format_table,
    plot_sweep,
    results_table,
    write_table,
)

log = logging.getLogger(__name__)

Task = Literal["pretrain", "caption", "retrieval"]

TASK_COMMANDS: dict[str, str] = {"pretrain": "pretrain", "caption": "finetune-caption", "retrieval": "finetune-retrieval"}
"""Task → the `mengzi-ray` command whose card class describes its training card."""

SWEPT_FIELDS: dict[str, tuple[str, str]] = {
    "learning_rate": ("optim", "learning_rate"),
    "warmup_steps": ("optim", "warmup_steps"),
    "global_batch_size": ("batch", "global_batch_size"),
}
"""Trial config key → (section, field) of the training card it sets."""


class TrainingRef(Section):
    """The training job every trial runs, as a card file plus `--set`-style overrides."""

    task: Task = Field(..., description="pretrain | caption | retrieval: picks the card class and the metrics")
    card: str = Field(..., min_length=1, description="path of the training job card (YAML)")
    overrides: list[str] = Field(default_factory=list, description="`a.b=value` overrides applied to that card")


class LogRange(Section):
    """A log-uniform range `[min, max)`; both ends positive, `min < max`."""

    min: float = Field(..., gt=0)
    max: float = Field(..., gt=0)

    @model_validator(mode="after")
    def _not_empty_or_inverted(self) -> "LogRange":
        if self.min == self.max:
            raise ValueError(f"empty range: min == max == {self.min:g} (use a single value in the training card)")
        if self.min > self.max:
            raise ValueError(f"inverted range: min {self.min:g} > max {self.max:g}")
        return self


def _distinct_choices(values: list[int] | None, name: str) -> list[int] | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{name} choices repeat a value: {values}")
    return values


class SearchSection(Section):
    """What each trial samples: lr log-uniformly, optional warmup / global batch choices (uniformly)."""

    learning_rate: LogRange
    warmup_steps: list[int] | None = Field(None, min_length=1, description="choices for optim.warmup_steps")
    global_batch_size: list[int] | None = Field(None, min_length=1, description="choices for batch.global_batch_size")
    num_samples: int = Field(8, ge=1, description="trials in the sweep")
    seed: int = Field(0, description="seed of the sampler: the same card samples the same trials")

    @model_validator(mode="after")
    def _choices_valid(self) -> "SearchSection":
        _distinct_choices(self.warmup_steps, "warmup_steps")
        _distinct_choices(self.global_batch_size, "global_batch_size")
        if any(v < 0 for v in self.warmup_steps or []):
            raise ValueError(f"warmup_steps choices must be >= 0: {self.warmup_steps}")
        if any(v < 1 for v in self.global_batch_size or []):
            raise ValueError(f"global_batch_size choices must be >= 1: {self.global_batch_size}")
        return self

    def choices(self) -> dict[str, list[int]]:
        """The discrete dimensions the card sweeps (key → values)."""
        found = {"warmup_steps": self.warmup_steps, "global_batch_size": self.global_batch_size}
        return {key: values for key, values in found.items() if values}

    def corner_points(self) -> list[dict[str, Any]]:
        """Every choice combination at both lr ends: if all of these make valid training cards, every trial does."""
        keys = list(self.choices())
        lrs = (self.learning_rate.min, self.learning_rate.max)
        combos = itertools.product(lrs, *(self.choices()[key] for key in keys))
        return [dict(zip(["learning_rate", *keys], combo)) for combo in combos]


class SchedulerSection(Section):
    """ASHA on one validation metric; its time axis is the reported training `step`."""

    metric: str = Field(..., description="a metric the task reports, e.g. val_cider, val_loss, val_rsum, val_i2t_R@1")
    grace_period_steps: int | None = Field(
        None, ge=1, description="steps before a trial can be stopped; default: the card's validation.every_steps"
    )
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps the top 1/reduction_factor at each rung")

    @property
    def mode(self) -> Literal["min", "max"]:
        return metric_mode(self.metric)


class TrialResourcesSection(Section):
    """How many trials run at once and what each one holds besides its Train workers (from the training card)."""

    max_concurrent_trials: int = Field(1, ge=1)
    driver_cpus: float = Field(0.1, gt=0, description="CPUs of each trial's driver function (it only waits on fit)")
    controller_failure_limit: int = Field(
        -1, ge=-1, description="worker-group scheduling failures before a trial errors (-1: wait for the autoscaler)"
    )


class TuneCard(Card):
    """`mengzi-ray tune`: a sweep over one training card. `run.max_failures` = retries of a failed trial."""

    ray: RaySection = RaySection()
    training: TrainingRef
    search: SearchSection
    scheduler: SchedulerSection
    resources: TrialResourcesSection = TrialResourcesSection()
    run: RunSection

    @model_validator(mode="after")
    def _finite_retries(self) -> "TuneCard":
        if self.run.max_failures < 0:
            raise ValueError("run.max_failures must be >= 0 for a sweep (a trial retried forever never ends)")
        return self


def training_card_class(task: str) -> type[Card]:
    return COMMANDS[TASK_COMMANDS[task]].card_class()


def load_training_card(ref: TrainingRef) -> Card:
    """Load and validate the training card a sweep names (ConfigError naming that file on any problem)."""
    return load_card(training_card_class(ref.task), ref.card, ref.overrides)


def sweep_training_card(card: TuneCard, training: Card) -> Card:
    """The training card the sweep runs: checkpoints ranked by the swept metric, so each trial keeps the
    checkpoint of its best value (the one the sweep exports if that trial wins)."""
    metric = f"checkpoint.metric={card.scheduler.metric}"
    if card.scheduler.metric not in training.metric_names():
        return training  # check_sweep names the problem
    data = apply_overrides(training.model_dump(mode="json"), [metric, f"checkpoint.mode={card.scheduler.mode}"])
    return validate_card(type(training), data, card.training.card)


def trial_card(task: str, base: dict[str, Any], params: dict[str, Any], source: str = "trial") -> Card:
    """The training card of one trial: `base` (a training card's dict) with the sampled params set."""
    overrides = []
    for key, value in params.items():
        if key not in SWEPT_FIELDS:
            raise ConfigError(f"{source}: unknown swept parameter {key!r}")
        overrides.append(f"{'.'.join(SWEPT_FIELDS[key])}={value!r}")
    return validate_card(training_card_class(task), apply_overrides(base, overrides), source)


def check_sweep(card: TuneCard, training: Card) -> None:
    """Everything that can be known wrong before a trial starts: raises ConfigError naming the field.

    The metric must be one the task's validation reports; every choice combination at both lr ends must make a
    valid training card (e.g. no global batch that per-worker batch × workers does not divide); the ASHA grace
    period must fit in the run.
    """
    source = f"tune card ({card.training.card})"
    validated = [m for m in training.metric_names() if m.startswith("val_")]
    if card.scheduler.metric not in validated:
        raise ConfigError(
            f"{source}: scheduler.metric {card.scheduler.metric!r} is not reported by {card.training.task} "
            f"training (its validation reports {', '.join(validated)})"
        )
    for point in card.search.corner_points():
        trial_card(card.training.task, training.model_dump(), point, f"{source}, search point {point}")
    max_steps = training.schedule.max_steps
    grace = card.scheduler.grace_period_steps or training.validation.every_steps
    if grace > max_steps:
        raise ConfigError(f"{source}: scheduler.grace_period_steps {grace} > the card's schedule.max_steps {max_steps}")


def check_capacity(card: TuneCard, training: Card, cluster_cpus: float, embedded: bool) -> None:
    """Concurrent trials must fit the cluster, or their worker groups wait on each other forever."""
    per_trial = training.scaling.num_workers * training.scaling.cpus_per_worker + card.resources.driver_cpus
    need = card.resources.max_concurrent_trials * per_trial
    if need <= cluster_cpus:
        return
    message = (
        f"resources.max_concurrent_trials {card.resources.max_concurrent_trials} × {per_trial:g} CPUs per trial "
        f"(workers × cpus_per_worker + driver_cpus) = {need:g} > the cluster's {cluster_cpus:g} CPUs"
    )
    if embedded:
        raise ConfigError(message)
    log.warning("%s: trials will wait for the autoscaler", message)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Train run name of one trial: unique in the sweep, stable across retries and resumes of that trial."""
    return f"{sweep_name}-{trial_id}"


def sweep_uri(card: TuneCard, *parts: str) -> str:
    """`<run.storage_path>/<run.name>/<parts>`; a local storage path is made absolute (trials run elsewhere)."""
    root = card.run.storage_path
    root = root.rstrip("/") if is_remote(root) else str(Path(root).resolve())
    return "/".join([root, card.run.name, *parts])


def run_trial(
    config: dict[str, Any],
    *,
    task: str,
    training: dict[str, Any],
    runs_storage: str,
    sweep: str,
    controller_failure_limit: int,
) -> None:
    """One Tune trial (runs in a trial actor): build this trial's training card and fit its TorchTrainer.

    Metrics reach Tune through `TuneReportCallback` (built here: it must be constructed inside the Tune session).
    A retried or resumed trial keeps its Train run name, so Train resumes it from its last checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mengzi_ray.training.jobs import build_trainer

    card = trial_card(task, training, config)
    name = trial_run_name(sweep, tune.get_context().get_trial_id())
    trainer = build_trainer(
        card,
        run_name=name,
        storage_path=runs_storage,
        callbacks=[TuneReportCallback()],
        controller_failure_limit=controller_failure_limit,
    )
    trainer.fit()


def _tune_storage(card: TuneCard) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, storage path inside it, experiment path inside it) of the sweep."""
    fs, root = filesystem_for(card.run.storage_path)
    return fs, root, f"{root.rstrip('/')}/{card.run.name}"


def _sweep_record(card: TuneCard, training: Card) -> dict[str, Any]:
    return {"tune": card.model_dump(mode="json", exclude={"ray"}), "training": training.model_dump(mode="json")}


def _read_record(fs: pafs.FileSystem, path: str) -> Any | None:
    """The sweep record at `path`, or None when it is absent or torn (an older, non-atomic write that crashed;
    reported in the log, and the caller writes it anew)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError as exc:
        log.warning("%s is torn (%s): writing it anew from the current cards", path, exc)
        return None




def _param_space(search: SearchSection) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {"learning_rate": tune.loguniform(search.learning_rate.min, search.learning_rate.max)}
    space.update({key: tune.choice(values) for key, values in search.choices().items()})
    return space


def _trainable(card: TuneCard, training: Card) -> Any:
    from ray import tune

    trainable = tune.with_parameters(
        run_trial,
        task=card.training.task,
        training=training.model_dump(mode="json"),
        runs_storage=sweep_uri(card, "runs"),
        sweep=card.run.name,
        controller_failure_limit=card.resources.controller_failure_limit,
    )
    return tune.with_resources(trainable, {"cpu": card.resources.driver_cpus})


def _tuner(card: TuneCard, training: Card) -> tuple[Any, bool]:
    """A new Tuner, or the restored one when the sweep's experiment exists (then True)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    fs, root, experiment = _tune_storage(card)
    record_path = f"{experiment}/sweep_card.json"
    trainable = _trainable(card, training)
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        record = _read_record(fs, record_path)
        if record is None:
            write_json(sweep_uri(card, "sweep_card.json"), _sweep_record(card, training))
        elif record != _sweep_record(card, training):
            raise ConfigError(
                f"{sweep_uri(card)}: a sweep named {card.run.name!r} with a different tune or training card exists; "
                "resume it with the same cards or choose a new run.name"
            )
        log.info("resuming the sweep at %s", sweep_uri(card))
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs), True
    write_json(sweep_uri(card, "sweep_card.json"), _sweep_record(card, training))
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=training.schedule.max_steps,
        grace_period=card.scheduler.grace_period_steps or training.validation.every_steps,
        reduction_factor=card.scheduler.reduction_factor,
    )
    tuner = tune.Tuner(
        trainable,
        param_space=_param_space(card.search),
        tune_config=tune.TuneConfig(
            metric=card.scheduler.metric,
            mode=card.scheduler.mode,
            num_samples=card.search.num_samples,
            scheduler=scheduler,
            # A generator instance takes the concurrency limit itself (TuneConfig's would be ignored).
            search_alg=BasicVariantGenerator(
                random_state=card.search.seed, max_concurrent=card.resources.max_concurrent_trials
            ),
        ),
        run_config=tune.RunConfig(
            name=card.run.name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=card.run.max_failures),
            verbose=1,
        ),
    )
    return tuner, False


def _checkpoint_uri(path: str, runs_storage: str) -> str:
    """Train reports checkpoint paths inside their filesystem: put the scheme back for s3:// sweeps."""
    return f"s3://{path}" if is_remote(runs_storage) and not is_remote(path) else path


def records_from_results(results: Any, metric: str, mode: str, sweep: str, runs_storage: str) -> list[TrialRecord]:
    """Tune's ResultGrid → one TrialRecord per trial: the (step, metric) curve it reported and the checkpoint
    saved with its best value (`checkpoint_path`, which TuneReportCallback adds to reports that saved one)."""
    records = []
    for result in results:
        frame = result.metrics_dataframe
        curve: list[tuple[int, float]] = []
        best_checkpoint = None
        if frame is not None and metric in frame and "step" in frame:
            reported = frame.dropna(subset=["step", metric])
            curve = [(int(step), float(value)) for step, value in zip(reported["step"], reported[metric])]
            if "checkpoint_path" in reported:
                saved = reported.dropna(subset=["checkpoint_path"])
                if len(saved):
                    row = saved[metric].idxmin() if mode == "min" else saved[metric].idxmax()
                    best_checkpoint = _checkpoint_uri(str(saved.loc[row, "checkpoint_path"]), runs_storage)
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        params = {key: result.config[key] for key in SWEPT_FIELDS if key in result.config}
        error = str(result.error).strip() if result.error is not None else None
        records.append(TrialRecord(trial_id, trial_run_name(sweep, trial_id), params, curve, error, best_checkpoint))
    return records


def export_model(checkpoint_uri: str, destination: str, training: Card, run_name: str, metric: str) -> str:
    """Write a model dir (MODEL_FILES of the checkpoint + training_card.json) at `destination`; returns it."""
    from mengzi_ray.training.jobs import MODEL_FILES
    from mengzi_ray.training.loop import HISTORY_FILE
    from mengzi_ray.training.report import training_card

    checkpoint = download_dir(checkpoint_uri)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        for name in MODEL_FILES:
            shutil.copyfile(checkpoint / name, model_dir / name)
        history = json.loads((checkpoint / HISTORY_FILE).read_text(encoding="utf-8"))
        best = {"path": checkpoint_uri, "metric": metric}
        card_json = training_card(training, run_name, history, best)
        (model_dir / "training_card.json").write_text(json.dumps(card_json, indent=2, ensure_ascii=False))
        return publish_dir(model_dir, destination)


def _params(row: Any) -> dict[str, Any]:
    """The swept params of a results-table row, as plain Python numbers."""
    return {key: row[key].item() if hasattr(row[key], "item") else row[key] for key in SWEPT_FIELDS if key in row}


def run_tune(card: TuneCard) -> dict[str, Any]:
    """Run (or resume) the sweep; write the table, plot, best model and summary; return the summary.

    Raises ConfigError before any trial for a bad card (search range, metric, batch choices, capacity, or a
    different sweep under the same name) and JobFailed when no trial reported the metric.
    """
    import os

    import ray

    from mengzi_ray.ray_runtime import ensure_ray
    training = sweep_training_card(card, load_training_card(card.training))
    check_sweep(card, training)
    ensure_ray(card.ray)
    embedded = not (card.ray.address or os.environ.get("RAY_ADDRESS"))
    check_capacity(card, training, ray.cluster_resources().get("CPU", 0.0), embedded)
    # Trials read the training card's relative paths from the job's working dir, not from their trial dirs.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    tuner, resumed = _tuner(card, training)
    results = tuner.fit()

    metric, mode = card.scheduler.metric, card.scheduler.mode
    records = records_from_results(results, metric, mode, card.run.name, sweep_uri(card, "runs"))
    table = results_table(records, metric, mode, training.schedule.max_steps)
    print(format_table(table), flush=True)
    outputs = write_table(table, sweep_uri(card, "results"))
    outputs.append(plot_sweep(records, table, metric, sweep_uri(card, "sweep.png")))
    summary: dict[str, Any] = {
        "sweep": sweep_uri(card),
        "resumed": resumed,
        "metric": metric,
        "mode": mode,
        "trials": len(table),
        "status_counts": {k: int(v) for k, v in table["status"].value_counts().items()},
        "outputs": outputs,
    }
    best = best_row(table, metric)
    if best is None or not best["checkpoint"]:
        write_json(sweep_uri(card, "summary.json"), summary)
        raise JobFailed(f"{sweep_uri(card)}: no trial saved a checkpoint with {metric}; see results.csv")
    best_trial = trial_card(card.training.task, training.model_dump(mode="json"), _params(best))
    best_model = export_model(best["checkpoint"], sweep_uri(card, "best_model"), best_trial, best["run"], metric)
    summary["best"] = {
        "trial": best["trial"],
        "run": best["run"],
        metric: float(best[metric]),
        "steps": int(best["steps"]),
        "params": _params(best),
        "checkpoint": best["checkpoint"],
        "model": best_model,
    }
    write_json(sweep_uri(card, "summary.json"), summary)
    return summary
