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
`best_model/` (the best trial's checkpoint of its best reported value, exported as a training run exports its
model: `jobs.export_model`), `summary.json`. Re-running an interrupted sweep restores it (`Tuner.restore`):
finished trials are kept, unfinished ones continue from their Train checkpoints. The card is `tune_card.py`, the
checks before any trial `tune_checks.py`, the results table and plot `tune_results.py`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow.fs as pafs

from mengzi_ray.config import Card, ConfigError, JobFailed
from mengzi_ray.storage import absolute, download_dir, filesystem_for, is_remote, write_json
from mengzi_ray.training.tune_card import (
    SWEPT_FIELDS,
    SearchSection,
    TuneCard,
    load_training_card,
    sweep_training_card,
    trial_card,
)
from mengzi_ray.training.tune_checks import check_capacity, check_sweep
from mengzi_ray.training.tune_results import (
    TrialRecord,
    best_row,
    format_table,
    plot_sweep,
    results_table,
    write_table,
)

log = logging.getLogger(__name__)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Train run name of one trial: unique in the sweep, stable across retries and resumes of that trial."""
    return f"{sweep_name}-{trial_id}"


def sweep_uri(card: TuneCard, *parts: str) -> str:
    """`<run.storage_path>/<run.name>/<parts>`; a local storage path is made absolute (trials run elsewhere)."""
    return "/".join([absolute(card.run.storage_path).rstrip("/"), card.run.name, *parts])


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
    from mengzi_ray.training.jobs import export_model

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
    best_model = export_model(
        download_dir(best["checkpoint"]), sweep_uri(card, "best_model"), best_trial, best["run"],
        {"path": best["checkpoint"], "metric": metric},
    )
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
