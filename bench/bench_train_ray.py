"""Caption training throughput on Ray Train: 2 workers vs 1 worker, and vs the same model in a plain
single-process PyTorch loop (the Ray overhead).

All three train the tiny captioner of jobs/caption_tiny.yaml (hidden 128, 2 layers, A/L/R 24/30/5) with 16 rows
per worker per step on the synthetic set. Ray runs report a wall-clock time at every validation; samples/s is
measured between the first and the last report (startup, the first data-pipeline pass and the final export are
excluded; the tiny 2-image greedy validation between reports is included). The plain loop is
`caption_local.train_captioner` (one process, examples tensorised in the loop, no Ray Data, no DDP).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from caption_local import train_captioner
from common import git_commit, print_table, write_results

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
PER_WORKER, STEPS, EVERY = 16, 120, 40


def ray_samples_per_second(workers: int, data: Path, root: Path) -> float:
    card = load_card(CaptionCard, CARD, [
        f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={root}",
        f"run.name=bench-{workers}", f"scaling.num_workers={workers}", f"batch.per_worker_batch_size={PER_WORKER}",
        f"batch.global_batch_size={PER_WORKER * workers}", f"schedule.max_steps={STEPS}", f"validation.every_steps={EVERY}",
        "data.max_val_images=2", "caption.num_beams=1", "optim.warmup_steps=0",
    ])
    run_training(card, controller_failure_limit=1)
    history = [json.loads(line) for line in (root / f"bench-{workers}" / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    return (last["step"] - first["step"]) * PER_WORKER * workers / (last["wall_time"] - first["wall_time"])


def plain_samples_per_second(data: Path, init_dir: Path) -> float:
    tokenizer = load_tokenizer(init_dir)
    card = load_card(CaptionCard, CARD, [f"data.features={data}/features", f"data.text={data}/text.jsonl"])
    model = OscarForCaptioning.from_pretrained(init_dir)
    records = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "train")
    tensorizer = CaptionTensorizer(tokenizer, CaptionTask(card, tokenizer).layout)
    train_captioner(model, tensorizer, records, steps=EVERY // 4, batch_size=PER_WORKER, lr=5e-4, log_every=0)  # warm-up
    start = time.perf_counter()
    train_captioner(model, tensorizer, records, steps=STEPS - EVERY, batch_size=PER_WORKER, lr=5e-4, log_every=0)
    return (STEPS - EVERY) * PER_WORKER / (time.perf_counter() - start)


def main() -> None:
    import ray

    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_synthetic_dataset(root / "syn", num_train=200, num_val=4).root
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        results = {"ray_1_worker": ray_samples_per_second(1, data, root / "runs")}
        results["ray_2_workers"] = ray_samples_per_second(2, data, root / "runs")
        ray.shutdown()
        results["plain_loop"] = plain_samples_per_second(data, root / "runs" / "bench-1" / "init")
    base = results["plain_loop"]
    rows = [[name, f"{v:.1f}", f"{v / base:.2f}", f"{v / results['ray_1_worker']:.2f}"] for name, v in results.items()]
    print_table(["setup", "samples/s", "vs plain loop", "vs 1 worker"], rows)
    settings = {"per_worker_batch": PER_WORKER, "steps": STEPS, "measured_between_steps": [EVERY, STEPS], "card": CARD.name}
    write_results(SCRIPT, torch.device("cpu"), commit, settings, results)


if __name__ == "__main__":
    main()
