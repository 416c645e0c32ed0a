"""What the training worker spends per micro-batch to turn data into the model's batch, per task: before (joined
Arrow rows → records → `make_batch`: tokenising and stacking in the worker) vs after (the task's upstream Ray Data
stage has already tokenised; the worker runs `step_batch`: captioning masks, retrieval draws negatives and composes
the pairs, pretraining pollutes, lays out and masks its pairs). The upstream stage's own cost is reported too: Ray
Data runs it beside training, off the step.

Oscar's layouts (captioning: 70 positions, 40 for the caption, 50 regions; retrieval: 70 positions, 50 regions;
pretraining: 35 positions, 50 regions) on
the synthetic set, 16 rows per micro-batch, one process, no Ray, the three paths interleaved:

    .venv/bin/python bench/bench_worker_batches.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import git_commit, interleaved_times, median, print_table, write_results

from mengzi_ray.config import load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import CaptionCard, PretrainCard, RetrievalCard
from mengzi_ray.training.examples import _attach_texts, read_text_table, to_records
from mengzi_ray.training.jobs import prepare_init
from mengzi_ray.training.negatives import NegativePool, PreparedPool
from mengzi_ray.training.tasks import POOL_ROWS, Task, task_for

SCRIPT = "bench_worker_batches"
JOBS = Path(__file__).resolve().parent.parent / "jobs"
ROWS = 16
TASKS = {
    "caption": (CaptionCard, "caption_tiny.yaml", ["caption.max_seq_length=70", "caption.max_seq_a_length=40",
                                                   "caption.max_img_seq_length=50"]),
    "retrieval": (RetrievalCard, "retrieval_tiny.yaml", ["retrieval.max_seq_length=70", "retrieval.max_img_seq_length=50"]),
    "retrieval + dual encoder": (RetrievalCard, "retrieval_tiny.yaml", [
        "retrieval.max_seq_length=70", "retrieval.max_img_seq_length=50", "retrieval.dual_encoder.enabled=true"]),
    "pretraining": (PretrainCard, "pretrain_tiny.yaml", ["pretrain.max_seq_length=35", "pretrain.max_img_seq_length=50"]),
}


def paths(task: Task, micro: list) -> dict:
    """The three timed functions over the same micro-batches. Each path keeps its generator and pool across
    repeats, as a training worker does (a ring's pages are written once, in its first pass)."""
    build, kwargs = task.upstream()
    prepared = [build(m, **kwargs) for m in micro]
    before_rng, after_rng = np.random.default_rng(0), np.random.default_rng(0)
    before_pool, after_pool = NegativePool(POOL_ROWS, before_rng), task.negative_pool(after_rng)

    def before() -> None:
        for m in micro:
            rows = to_records(m)
            before_pool.add(rows)
            task.make_batch(rows, before_rng, before_pool)

    def upstream() -> None:
        for m in micro:
            build(m, **kwargs)

    def after() -> None:
        for p in prepared:
            task.step_batch(p, after_rng, after_pool)

    if isinstance(after_pool, PreparedPool):  # steady state: every ring page written once, as in a long run
        while after_pool.ring.size < after_pool.ring.capacity:
            after()
    return {"worker, before (rows → make_batch)": before, "upstream stage (Ray Data)": upstream,
            "worker, after (step_batch)": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    commit = git_commit()
    device = torch.device("cpu")
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_synthetic_dataset(root / "syn", num_train=64, num_val=4).root
        joined = _attach_texts(pq.read_table(data / "features"), read_text_table(str(data / "text.jsonl"), "train", "caption"), False)
        micro = [joined.slice(s, ROWS) for s in range(0, joined.num_rows - ROWS + 1, ROWS)]
        for name, (card_cls, card_file, extra) in TASKS.items():
            card = load_card(card_cls, JOBS / card_file, [f"data.features={data}/features", f"data.text={data}/text.jsonl",
                                                         f"run.storage_path={root}", *extra])
            init_dir, _ = prepare_init(card, str(root / name.replace(" ", "_")))
            task = task_for(card, load_tokenizer(init_dir))
            times, _ = interleaved_times(paths(task, micro), args.repeats, device)
            ms = {path: 1000 * median(t) / len(micro) for path, t in times.items()}
            results[name] = ms
            before, after = ms["worker, before (rows → make_batch)"], ms["worker, after (step_batch)"]
            rows += [[name, path, f"{v:.2f}", f"{before / v:.1f}x" if path.startswith("worker, after") else ""]
                     for path, v in ms.items()]
            results[name]["worker_speedup"] = before / after
    print_table(["task", "path", "ms per micro-batch", "worker speed-up"], rows)
    settings = {"rows_per_micro_batch": ROWS, "micro_batches": len(micro), "repeats": args.repeats,
                "layouts": {name: extra for name, (_, _, extra) in TASKS.items()}}
    write_results(SCRIPT, device, commit, settings, results)


if __name__ == "__main__":
    main()
