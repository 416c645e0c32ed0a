"""What a finished run leaves for people: metrics.jsonl, PNG curves and the training card of the exported model.

Called by the driver (`jobs.run_training`) with the history rank 0 kept in the final checkpoint; writes to a
local dir that the driver then copies to the run's storage (local or s3://).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mengzi_ray.training.card import TrainCard


def write_metrics(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """metrics.jsonl (one line per validation) + loss.png (train/val loss) + validation.png (the task metrics)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "metrics.jsonl").open("w", encoding="utf-8") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    written = [out_dir / "metrics.jsonl"]
    steps = [row["step"] for row in history]
    losses = [k for k in ("train_loss", "val_loss") if any(k in row for row in history)]
    others = sorted({k for row in history for k in row if k.startswith("val_") and k != "val_loss"})
    for name, keys, ylabel in (("loss.png", losses, "loss"), ("validation.png", others, "metric")):
        if not keys:
            continue
        # A bare Figure draws with Agg on savefig and leaves pyplot's global backend alone (a notebook importing
        # this module keeps its own).
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        for key in keys:
            ax.plot(steps, [row.get(key, float("nan")) for row in history], marker="o", label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        written.append(out_dir / name)
    return written


def git_commit() -> str:
    """The commit of the code that ran ("unknown" outside a git checkout, e.g. a packaged job)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def training_card(card: TrainCard, run_name: str, history: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    """The training_card.json of an exported model dir: task, data, the full job card, metrics, commit."""
    return {
        "task": card.task,
        "run_name": run_name,
        "data": card.data.model_dump(),
        "job_card": card.model_dump(mode="json"),
        "final_metrics": history[-1] if history else {},
        "best_checkpoint": best,
        "commit": git_commit(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
