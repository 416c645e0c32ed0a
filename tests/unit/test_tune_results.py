"""Sweep results: table rows, status, best trial, CSV/Parquet round trip, the PNG plot (no Ray)."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow.parquet as pq

from mengzi_ray.training.tune_results import (
    TrialRecord,
    best_row,
    best_value,
    format_table,
    plot_sweep,
    results_table,
    trial_status,
    write_table,
)

RECORDS = [
    TrialRecord("t0", "s-t0", {"learning_rate": 1e-5, "warmup_steps": 0}, [(10, 0.2), (20, 0.5), (30, 0.4)]),
    TrialRecord("t1", "s-t1", {"learning_rate": 1e-3, "warmup_steps": 5}, [(10, 0.1)]),
    TrialRecord(
        "t2", "s-t2", {"learning_rate": 1e-4, "warmup_steps": 0}, [(10, 0.3), (20, 0.9), (30, 0.8)], None, "/ck/t2-20"
    ),
    TrialRecord("t3", "s-t3", {"learning_rate": 3e-4, "warmup_steps": 5}, [], "RayTaskError: worker died\ntrace"),
    TrialRecord("t4", "s-t4", {"learning_rate": 2e-4, "warmup_steps": 0}),
]


def test_status_and_best_value():
    assert [trial_status(r, max_steps=30) for r in RECORDS] == ["completed", "stopped", "completed", "error", "not run"]
    assert best_value([0.3, math.nan, 0.1], "min") == 0.1 and best_value([0.3, 0.9], "max") == 0.9
    assert math.isnan(best_value([], "max"))


def test_table_is_sorted_best_first_with_the_best_reported_value():
    table = results_table(RECORDS, "val_cider", "max", max_steps=30)
    assert list(table.columns) == [
        "trial", "run", "learning_rate", "warmup_steps", "val_cider", "steps", "status", "error", "checkpoint",
    ]
    assert list(table["trial"]) == ["t2", "t0", "t1", "t3", "t4"]
    assert table.iloc[0]["val_cider"] == 0.9 and table.iloc[0]["steps"] == 30  # best ever, not the last (0.8)
    assert best_row(table, "val_cider")[["run", "checkpoint"]].tolist() == ["s-t2", "/ck/t2-20"]
    by_loss = results_table(RECORDS, "val_loss", "min", max_steps=30)
    assert list(by_loss["trial"][:3]) == ["t1", "t0", "t2"]
    assert "global_batch_size" not in table  # only swept params get a column


def test_no_reported_metric_means_no_best():
    table = results_table(RECORDS[3:], "val_cider", "max", max_steps=30)
    assert best_row(table, "val_cider") is None
    assert best_row(results_table([], "val_cider", "max", max_steps=30), "val_cider") is None


def test_csv_parquet_and_plot_written(tmp_path):
    table = results_table(RECORDS, "val_cider", "max", max_steps=30)
    csv_uri, parquet_uri = write_table(table, str(tmp_path / "out" / "results"))
    from_csv = pd.read_csv(csv_uri, keep_default_na=False)
    assert list(from_csv["trial"]) == list(table["trial"]) and from_csv["steps"].tolist() == [30, 30, 10, 0, 0]
    from_parquet = pq.read_table(parquet_uri).to_pandas()
    pd.testing.assert_frame_equal(from_parquet, table)
    png = plot_sweep(RECORDS, table, "val_cider", str(tmp_path / "out" / "sweep.png"))
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    printed = format_table(table)
    assert "RayTaskError: worker died" in printed and "trace" not in printed and "stopped" in printed
    assert "/ck/t2-20" not in printed
