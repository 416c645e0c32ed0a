"""Where the Ray Train tax of bench_train_ray comes from: the same plain caption loop
(`bench_train_ray.plain_samples_per_second`, `--case` small or base size, no Ray Data, no DDP) timed in this process's main thread,
in a second thread of this process, and inside a 1-worker `TorchTrainer` train function (Ray Train 2 runs it in
a `TrainingThread` of the worker, ray/train/v2/_internal/execution/worker_group/thread_runner.py), with the same
torch threads everywhere. Two more places separate the thread from its neighbours: a fresh process's main thread,
and a second thread of a fresh process whose main thread runs no torch op. (libgomp gives every thread that starts
a parallel region a team of its own; a process with two teams has more OpenMP threads than this VM has cores, and
libgomp then spins only briefly before sleeping, which small ops pay for at every region.) The runs alternate,
`--repeats` times each, so a drift in the machine's speed hits all; the table gives each run and the medians.

    .venv/bin/python bench/bench_train_thread.py [--case small|base] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from bench_train_ray import CARD, CASES, Case, plain_samples_per_second
from common import git_commit, init_local_ray, print_table, write_results

from mengzi_ray.config import load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.jobs import prepare_init

SCRIPT = "bench_train_thread"


def in_second_thread(fn, *args):
    """fn(*args) run in a fresh thread of this process (its own OpenMP team)."""
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    return out[0]


def in_fresh_process(case_name: str, threaded: bool, threads: int, data: Path, init_dir: Path) -> float:
    """The loop in a new Python process, in its main thread or (threaded) in a second thread while the main thread
    never runs a torch op: a second thread is then the only OpenMP team of the process."""
    argv = [sys.executable, __file__, "--case", case_name, "--child", "thread" if threaded else "main", str(threads), str(data), str(init_dir)]
    return float(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()[-1])


def child(case: Case, mode: str, threads: str, data: str, init_dir: str) -> None:
    """`--child`: one run of the loop, its rate printed last."""
    args = (case, int(threads), Path(data), Path(init_dir))
    print(in_second_thread(plain_samples_per_second, *args) if mode == "thread" else plain_samples_per_second(*args))


def in_train_function(case, threads: int, data: Path, init_dir: Path, root: Path, repeats: int) -> list[float]:
    """The loop `repeats` times inside one Ray Train worker reserving `threads` CPUs (its OMP_NUM_THREADS)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = root / "train_fn_rates.json"  # a local Ray: the worker writes where this process reads

    def train_fn(config: dict) -> None:
        out.write_text(json.dumps([plain_samples_per_second(case, threads, data, init_dir) for _ in range(repeats)]))

    TorchTrainer(
        train_fn, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name="thread-bench", storage_path=str(root / "runs")),
    ).fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=[c.name for c in CASES], default="small", help="bench_train_ray's model size")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "THREADS", "DATA", "INIT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = next(c for c in CASES if c.name == args.case)
    if args.child:
        return child(case, *args.child)
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_synthetic_dataset(root / "syn", num_train=200, num_val=4).root
        card = load_card(CaptionCard, CARD, [f"data.features={data}/features", f"data.text={data}/text.jsonl", *case.overrides()])
        init_dir = Path(prepare_init(card, str(root / "init_run"))[0])
        runs: dict[str, list[float]] = {"main thread": [], "second thread": [], "fresh process, main thread": [],
                                        "fresh process, second thread only": []}
        for _ in range(args.repeats):
            runs["main thread"].append(plain_samples_per_second(case, args.threads, data, init_dir))
            runs["second thread"].append(in_second_thread(plain_samples_per_second, case, args.threads, data, init_dir))
            runs["fresh process, main thread"].append(in_fresh_process(case.name, False, args.threads, data, init_dir))
            runs["fresh process, second thread only"].append(in_fresh_process(case.name, True, args.threads, data, init_dir))
        # Ray workers inherit this environment: the train function imports bench_train_ray from bench/
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
        init_local_ray(args.threads + 2)
        runs["Ray Train function"] = in_train_function(case, args.threads, data, init_dir, root, args.repeats)
    base = statistics.median(runs["main thread"])
    results = {name: {"samples_per_s": rates, "median": statistics.median(rates), "vs_main_thread": statistics.median(rates) / base}
               for name, rates in runs.items()}
    print_table(["where the loop runs", "samples/s per run", "median", "vs main thread"],
                [[name, " / ".join(f"{r:.1f}" for r in res["samples_per_s"]), f"{res['median']:.1f}", f"{res['vs_main_thread']:.2f}"]
                 for name, res in results.items()])
    settings = {"case": case.__dict__, "threads": args.threads, "repeats": args.repeats}
    write_results(SCRIPT if case.name == "small" else f"{SCRIPT}_{case.name}", torch.device("cpu"), commit, settings, results)


if __name__ == "__main__":
    main()
