"""The tiny caption sweep (jobs/tune_tiny.yaml) on local Ray: a sweep whose driver is killed resumes without
rerunning finished trials; ASHA stops trials early, the best trial is the one with the best reported metric and
its exported model dir generates.

The trials run the real caption Train loop on a small synthetic set; only data paths and storage are redirected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mengzi_ray.config import ConfigError, validate_card
from mengzi_ray.data.records import load_image_records
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.inference import Captioner
from mengzi_ray.training.tune import run_tune
from mengzi_ray.training.tune_card import TuneCard

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune_data")
    write_synthetic_dataset(root, num_train=48, num_val=8)
    return root


def tiny_card_data(synthetic: Path, storage: Path, name: str) -> dict:
    """jobs/tune_tiny.yaml with its data and storage redirected into the test's tmp dirs."""
    data = yaml.safe_load((REPO / "jobs/tune_tiny.yaml").read_text(encoding="utf-8"))
    data["training"]["card"] = str(REPO / data["training"]["card"])
    data["training"]["overrides"] += [f"data.features={synthetic}/features", f"data.text={synthetic}/text.jsonl"]
    data["run"].update(name=name, storage_path=str(storage))
    # One trial at a time: ASHA compares a trial with those that reached a rung before it, and two trials
    # reporting in the same second (or a restored sweep, whose rungs start empty) left every trial running in one
    # CI run; in sequence, seed 0's later, smaller learning rates meet the earlier results at each rung.
    data["resources"]["max_concurrent_trials"] = 1
    return data


def trial_reports(sweep: Path, metric: str) -> dict[str, list[float]]:
    """trial id → every value of `metric` Tune logged for it (read from the trial dirs' result.json)."""
    reports: dict[str, list[float]] = {}
    for result_file in sweep.glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            row = json.loads(line)
            if metric in row:
                reports.setdefault(row["trial_id"], []).append(row[metric])
    return reports


def check_finished_sweep(summary: dict, sweep: Path, synthetic: Path, data: dict) -> None:
    """The sweep's outputs: ASHA stopped some trials early, the table and plot exist, the best trial is the one
    with the best reported val_loss, its exported model generates, and a different card under the same name is
    refused before anything runs."""
    table = pd.read_parquet(sweep / "results.parquet")
    assert len(table) == 4 and summary["trials"] == 4
    assert set(table["status"]) <= {"completed", "stopped"}, table
    stopped = table[table["status"] == "stopped"]
    assert len(stopped) >= 1 and (stopped["steps"] < 40).all()  # ASHA ended them before max_steps
    assert (table.loc[table["status"] == "completed", "steps"] == 40).all()
    assert pd.read_csv(sweep / "results.csv")["trial"].tolist() == table["trial"].tolist()
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    reports = trial_reports(sweep, "val_loss")
    assert len(reports) == 4
    best_trial = min(reports, key=lambda trial: min(reports[trial]))
    assert summary["best"]["trial"] == best_trial
    assert summary["best"]["val_loss"] == pytest.approx(min(reports[best_trial]))
    assert table.iloc[0]["trial"] == best_trial

    model_dir = Path(summary["best"]["model"])
    card_json = json.loads((model_dir / "training_card.json").read_text())
    assert card_json["job_card"]["optim"]["learning_rate"] == pytest.approx(summary["best"]["params"]["learning_rate"])
    val = load_image_records(synthetic / "features/part-0.parquet", synthetic / "text.jsonl", "val")[:2]
    captions = Captioner.from_model_dir(str(model_dir), "cpu", max_gen_length=22).caption_records(val, num_beams=2)
    assert set(captions) == {r.image_id for r in val}
    assert all(isinstance(text, str) and 0 < score <= 1 for text, score in captions.values())

    # Same name, different card: refused before anything runs, the finished sweep untouched.
    other = {**data, "search": {**data["search"], "learning_rate": {**data["search"]["learning_rate"], "max": 1.0e-2}}}
    with pytest.raises(ConfigError, match="different tune or training card"):
        run_tune(validate_card(TuneCard, other, "tune_tiny.yaml"))
    assert pd.read_parquet(sweep / "results.parquet").equals(table)


def finished_trials(sweep: Path) -> dict[str, int]:
    """trial id → lines in its result.json, for the trials Tune's saved experiment state records as TERMINATED."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(str(sweep)).trials
    except (ValueError, OSError):  # no (complete) state file yet
        return {}
    return {
        t.trial_id: len((Path(t.path) / "result.json").read_text().splitlines())
        for t in trials
        if t.status == "TERMINATED"
    }


def test_sweep_killed_mid_run_resumes_and_reports_the_best_trial(ray_local, synthetic, tmp_path):
    # One sweep serves both contracts (a killed driver resumes; the finished sweep's outputs are right): a sweep
    # costs minutes on two cores, and the code after tuner.fit() is the same for a fresh and a resumed sweep.
    data = tiny_card_data(synthetic, tmp_path, "killed")
    card_path = tmp_path / "tune_killed.yaml"
    card_path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = tmp_path / "driver.log"
    with log_path.open("wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "mengzi_ray.cli", "tune", "--config", str(card_path)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    sweep = tmp_path / "killed"
    try:
        finished: dict[str, int] = {}
        for _ in range(300):  # bounded: 300 polls of 2 s
            finished = finished_trials(sweep)
            if finished or driver.poll() is not None:
                break
            time.sleep(2)
        assert driver.poll() is None, "the sweep ended early:\n" + log_path.read_text(errors="replace")[-3000:]
        assert 1 <= len(finished) < 4
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        # The driver's embedded Ray (raylet, GCS, workers) lives in the session we started for it.
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (sweep / "results.csv").exists()

    summary = run_tune(validate_card(TuneCard, data, str(card_path)))
    assert summary["resumed"] and summary["trials"] == 4
    after = finished_trials(sweep)
    assert len(after) == 4
    for trial_id, lines in finished.items():
        assert after[trial_id] == lines, f"finished trial {trial_id} was run again"
    check_finished_sweep(summary, sweep, synthetic, data)
