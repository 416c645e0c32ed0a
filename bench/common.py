"""Helpers shared by the benchmark scripts: device, timing, machine/commit info, the results file, the table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOADAVG_AT_START = [round(x, 2) for x in os.getloadavg()]
"""The load average when the bench imported this module, before it ran anything: the figure that says whether the
machine was idle (the end-of-run `loadavg` includes the bench's own load)."""
REPO_ROOT = Path(__file__).resolve().parent.parent


def init_local_ray(num_cpus: int = 4) -> None:
    """A local Ray for one bench, without Ray Data's progress bars and worker output on the console
    (mengzi_ray.console.quiet_ray): they cost the driver CPU that the timings would count, and their tqdm lock has
    deadlocked `ray.shutdown()` in a bench."""
    from mengzi_ray.console import quiet_ray
    from mengzi_ray.ray_runtime import start_local_ray

    start_local_ray(num_cpus, include_dashboard=False, **quiet_ray())


def timed_batches(actor_cls: type, log: Path) -> type:
    """A subclass of a Ray Data batch actor class that appends {start, end, rows} (wall clock) of every batch to
    `log`: made here, at run time, so Ray ships the class by value and the path travels with it. The benches take
    start-up (to the first batch) apart from the steady rate with it."""

    class Timed(actor_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: Any) -> Any:
            start = time.time()
            out = super().__call__(batch)
            with log.open("a") as f:
                f.write(json.dumps({"start": start, "end": time.time(), "rows": len(batch)}) + "\n")
            return out

    Timed.__name__ = f"Timed{actor_cls.__name__}"
    return Timed


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Run `fn` once; return (seconds, its result), with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each function `repeats` times, alternating between them so machine noise hits all alike.

    Returns the seconds of every run per name and each function's result from its last run.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, last[name] = timed(fn, device)
            times[name].append(seconds)
    return times, last


def median(values: Sequence[float]) -> float:
    """The median of the timed runs (robust to one disturbed run)."""
    return statistics.median(values)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Core count, platform, torch version, threads, device, and the 1/5/15-min load average at the bench's start and
    now (others' load skews)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": name,
        "loadavg_at_start": LOADAVG_AT_START,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit() -> dict[str, Any]:
    """HEAD's commit and whether code differs from it (uncommitted changes outside bench/results/)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    changed = git("status", "--porcelain", "--", ".", ":!bench/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}


def write_results(
    script: str, device: torch.device, commit: dict[str, Any], settings: dict[str, Any], results: Any
) -> Path:
    """Write bench/results/<script>.json with commit (`git_commit()` taken before the run), machine, settings and
    results; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{script}.json"
    record = {
        "script": script,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **commit,
        "machine": machine_info(device),
        "settings": settings,
        "results": results,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain fixed-width table."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
