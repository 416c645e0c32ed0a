"""What a sweep leaves behind: the results table (CSV + Parquet), the lr/curve plot (PNG), the best trial.

Pure functions over `TrialRecord`s, so they are testable without Ray; `tune.run_tune` turns Tune's ResultGrid
into records (`records_from_results`) and calls these.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mengzi_ray.storage import write_bytes

PARAM_COLUMNS = ("learning_rate", "warmup_steps", "global_batch_size")


@dataclass
class TrialRecord:
    """One trial as the sweep saw it.

    `curve` holds (step, metric value) per validation report, in report order; `error` is the trial's final
    error message (None when it ended normally); `run_name` is its Train run under the sweep's `runs/`;
    `best_checkpoint` is the URI of the checkpoint saved with its best reported value (None if none was saved).
    """

    trial_id: str
    run_name: str
    params: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    best_checkpoint: str | None = None


def best_value(values: Sequence[float], mode: str) -> float:
    """The best of `values` (NaNs ignored) under `mode` ("min" | "max"); NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)


def trial_status(record: TrialRecord, max_steps: int) -> str:
    """error | completed (reached max_steps) | stopped (ASHA ended it early) | not run (no report yet)."""
    if record.error:
        return "error"
    if not record.curve:
        return "not run"
    return "completed" if record.curve[-1][0] >= max_steps else "stopped"


def results_table(records: Sequence[TrialRecord], metric: str, mode: str, max_steps: int) -> pd.DataFrame:
    """One row per trial: trial, run, swept params, best reported `metric`, last step, status, error, checkpoint.

    Rows are sorted best first (trials without a value last); the metric column is named after the metric.
    """
    swept = [name for name in PARAM_COLUMNS if any(name in r.params for r in records)]
    rows = []
    for record in records:
        row: dict[str, Any] = {"trial": record.trial_id, "run": record.run_name}
        row.update({name: record.params.get(name) for name in swept})
        row[metric] = best_value([value for _, value in record.curve], mode)
        row["steps"] = record.curve[-1][0] if record.curve else 0
        row["status"] = trial_status(record, max_steps)
        row["error"] = record.error or ""
        row["checkpoint"] = record.best_checkpoint or ""
        rows.append(row)
    columns = ["trial", "run", *swept, metric, "steps", "status", "error", "checkpoint"]
    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return table.reset_index(drop=True)


def best_row(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best trial of a `results_table` (its first row), or None when no trial reported the metric."""
    if table.empty or pd.isna(table.iloc[0][metric]):
        return None
    return table.iloc[0]


def write_table(table: pd.DataFrame, uri_prefix: str) -> list[str]:
    """Write `<uri_prefix>.csv` and `<uri_prefix>.parquet` (local or s3://); returns the two URIs."""
    csv_uri, parquet_uri = f"{uri_prefix}.csv", f"{uri_prefix}.parquet"
    write_bytes(csv_uri, table.to_csv(index=False).encode("utf-8"))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buffer)
    write_bytes(parquet_uri, buffer.getvalue())
    return [csv_uri, parquet_uri]


def plot_sweep(records: Sequence[TrialRecord], table: pd.DataFrame, metric: str, uri: str) -> str:
    """PNG with two panels: lr (log axis) vs best metric, coloured by status; metric vs step per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"completed": "tab:green", "stopped": "tab:orange", "error": "tab:red", "not run": "tab:gray"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for status, rows in table.dropna(subset=[metric]).groupby("status"):
        left.scatter(rows["learning_rate"], rows[metric], label=status, color=colours.get(status, "tab:blue"))
    left.set_xscale("log")
    left.set_xlabel("learning rate")
    left.set_ylabel(f"best {metric}")
    left.legend(title="status")
    left.grid(True, which="both", alpha=0.3)
    for record in records:
        if record.curve:
            steps, values = zip(*record.curve)
            lr = record.params.get("learning_rate")
            right.plot(steps, values, marker="o", markersize=3, label=f"{record.trial_id} lr={lr:.2e}")
    right.set_xlabel("step")
    right.set_ylabel(metric)
    right.grid(True, alpha=0.3)
    if right.lines:
        right.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes(uri, buffer.getvalue())
    return uri


def format_table(table: pd.DataFrame) -> str:
    """The table as printed at the end of a sweep (errors cut to one short line)."""
    shown = table.drop(columns=["checkpoint"]).assign(error=table["error"].str.split("\n").str[0].str.slice(0, 60))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")
