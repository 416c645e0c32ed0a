"""Caption training throughput on Ray Train (1 worker, and 2 for the small model) vs the same model in a plain
single-process PyTorch loop (the Ray overhead), at two sizes of jobs/caption_tiny.yaml's captioner
(A/L/R 24/30/5, vocab built from the synthetic set):

    small   hidden 256, 4 layers, 4 heads, FFN 1024, 16 rows per worker per step
    base    hidden 768, 12 layers, 12 heads, FFN 3072, 4 rows per worker per step

Ray runs report a wall-clock time at every validation; samples/s is measured between the first and the last
report (startup, the first data-pipeline pass and the final export are excluded), less the validation time the
reports record (`validation_s`: greedy decoding of the 2 val images and their loss; the plain loop validates
nothing). The share of that window the worker spent blocked on its input (the reports' `data_wait_s`) is reported
beside it: near 0, the Ray Data pipeline keeps up and the tax is elsewhere. The report barriers stay in. The full-state checkpoint is written only at the last step (after the
last report's clock reading): the plain loop writes none, and a checkpoint's cost is the card's cadence times the
model's size, not a per-step tax (a base-size one is ~1.4 GB of weights and Adam moments). The plain loop is `caption_local.train_captioner` (one process,
examples tensorised in the loop, no Ray Data, no DDP) with the same step (training/step.py). Both get the same
compute: `--threads` (default: the machine's cores) torch threads in the plain loop, and as many CPUs reserved for
the one Ray worker (Ray sets its OMP_NUM_THREADS to them; several workers share them), so the ratio is the Ray tax
rather than one thread against all cores. Each case runs `--repeats` times (default 3), Ray and the plain loop in
turn, and the medians are compared: on a small shared machine one run of either moves by 10–20%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from caption_local import train_captioner
from common import git_commit, init_local_ray, print_table, write_results

from mengzi_ray.config import load_card
from mengzi_ray.data.captioning import CaptionTensorizer
from mengzi_ray.data.records import load_image_records
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.modeling import OscarForCaptioning
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.jobs import run_training
from mengzi_ray.training.tasks import CaptionTask

SCRIPT = "bench_train_ray"
CARD = Path(__file__).resolve().parent.parent / "jobs" / "caption_tiny.yaml"


@dataclass(frozen=True)
class Case:
    """A model size, rows per worker per step, the steps of a run and the validation (= report) interval."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    per_worker: int
    steps: int
    every: int
    worker_counts: tuple[int, ...]

    def overrides(self) -> list[str]:
        return [f"model.tiny.hidden_size={self.hidden}", f"model.tiny.num_hidden_layers={self.layers}",
                f"model.tiny.num_attention_heads={self.heads}", f"model.tiny.intermediate_size={self.intermediate}"]


CASES = (
    Case("small", 256, 4, 4, 1024, per_worker=16, steps=180, every=60, worker_counts=(1, 2)),
    Case("base", 768, 12, 12, 3072, per_worker=4, steps=60, every=20, worker_counts=(1,)),
)


def ray_samples_per_second(case: Case, workers: int, threads: int, data: Path, root: Path) -> tuple[float, float]:
    """(samples/s, share of the measured window rank 0 spent waiting on its input: the reports' data_wait_s).
    Each worker reserves threads // workers CPUs (Ray gives it that many torch threads: OMP_NUM_THREADS)."""
    card = load_card(CaptionCard, CARD, [f"scaling.cpus_per_worker={max(1, threads // workers)}",
        f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={root}",
        f"run.name=bench-{case.name}-{workers}", f"scaling.num_workers={workers}",
        f"batch.per_worker_batch_size={case.per_worker}", f"batch.global_batch_size={case.per_worker * workers}",
        f"schedule.max_steps={case.steps}", f"validation.every_steps={case.every}",
        f"checkpoint.every_steps={case.steps}", "data.max_val_images=2", "caption.num_beams=1", "optim.warmup_steps=0", *case.overrides(),
    ])
    run_training(card, controller_failure_limit=1)
    history = [json.loads(line) for line in (root / card.run.name / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    validating = sum(h["validation_s"] for h in history[:-1])  # rank 0 validates after each report's clock reading
    window = last["wall_time"] - first["wall_time"] - validating
    waited = sum(h["data_wait_s"] for h in history[1:])
    return (last["step"] - first["step"]) * case.per_worker * workers / window, waited / window


def plain_samples_per_second(case: Case, threads: int, data: Path, init_dir: Path) -> float:
    """The same init dir as the Ray runs; a warm-up of a quarter interval, then as many steps as Ray measures."""
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(init_dir)
    card = load_card(CaptionCard, CARD, [f"data.features={data}/features", f"data.text={data}/text.jsonl"])
    model = OscarForCaptioning.from_pretrained(init_dir)
    records = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "train")
    tensorizer = CaptionTensorizer(tokenizer, CaptionTask(card, tokenizer).layout)
    steps = case.steps - case.every
    train_captioner(model, tensorizer, records, steps=max(1, case.every // 4), batch_size=case.per_worker, lr=5e-4, log_every=0)
    start = time.perf_counter()
    train_captioner(model, tensorizer, records, steps=steps, batch_size=case.per_worker, lr=5e-4, log_every=0)
    return steps * case.per_worker / (time.perf_counter() - start)


def main() -> None:
    import ray

    by_name = {c.name: c for c in CASES}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(by_name), help=f"comma-separated cases to run, of {sorted(by_name)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the plain loop = CPUs (hence threads) of the one Ray worker, split among several")
    parser.add_argument("--repeats", type=int, default=3, help="Ray and plain runs per case, in turn (medians reported)")
    args = parser.parse_args()
    unknown = sorted(set(args.cases.split(",")) - set(by_name))
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; choose from {sorted(by_name)}")
    cases = [by_name[name] for name in args.cases.split(",")]
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_synthetic_dataset(root / "syn", num_train=200, num_val=4).root
        runs: dict[str, dict[str, list[float]]] = {}
        data_wait: dict[str, dict[str, list[float]]] = {}
        for case in cases:
            runs[case.name], data_wait[case.name] = {}, {}
            for repeat in range(args.repeats):  # Ray, then the plain loop, in turn: machine drift hits both alike
                init_local_ray(args.threads + 2)  # 2 for Ray Data
                for n in case.worker_counts:
                    name = f"ray_{n}_worker{'s' if n > 1 else ''}"
                    rate, waited = ray_samples_per_second(case, n, args.threads, data, root / f"runs{repeat}")
                    runs[case.name].setdefault(name, []).append(rate)
                    data_wait[case.name].setdefault(name, []).append(waited)
                ray.shutdown()
                init_dir = root / f"runs{repeat}" / f"bench-{case.name}-1" / "init"
                runs[case.name].setdefault("plain_loop", []).append(plain_samples_per_second(case, args.threads, data, init_dir))
    results = {case: {name: statistics.median(rates) for name, rates in r.items()} for case, r in runs.items()}
    rows = [[case, name, " / ".join(f"{x:.1f}" for x in runs[case][name]), f"{v:.1f}", f"{v / r['plain_loop']:.2f}",
             f"{v / r['ray_1_worker']:.2f}"] for case, r in results.items() for name, v in r.items()]
    print_table(["model", "setup", "samples/s per run", "median", "vs plain loop", "vs 1 worker"], rows)
    print("share of the Ray window spent waiting on input: " + "; ".join(
        f"{case} {name} " + " / ".join(f"{w:.3f}" for w in waits) for case, r in data_wait.items() for name, waits in r.items()))
    settings = {"cases": [c.__dict__ for c in cases], "card": CARD.name, "threads": args.threads, "repeats": args.repeats,
                "measured": "between the first and the last validation report (steps every..steps), less validation_s; "
                            "medians of the repeats (per-run rates under runs)"}
    write_results(SCRIPT, torch.device("cpu"), commit, settings, {**results, "runs": runs, "data_wait_share": data_wait})


if __name__ == "__main__":
    main()
