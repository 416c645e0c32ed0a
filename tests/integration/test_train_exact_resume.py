"""Exact resume on Ray Train: the only worker is SIGKILLed mid-epoch, Ray Train restores it from the last
checkpoint, and the epoch it was in is seen exactly once across the crash (ids logged per micro-batch by
`fault_drill.log_ids`). One worker: with several, Ray Data's streaming split hands blocks to workers on demand, so
only the epoch's length is kept on resume, not which worker sees which example (README, "Resume")."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mengzi_ray.config import load_card
from mengzi_ray.data.records import read_text_rows
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.training.card import CaptionCard
from mengzi_ray.training.jobs import run_training
from mengzi_ray.training.loop import FAULT_MARKER

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_a_killed_worker_resumes_its_epoch_with_every_example_once(ray_local, tmp_path: Path, cache: bool) -> None:
    data = write_synthetic_dataset(tmp_path / "syn", num_train=24, num_val=4).root  # 72 captions: 18 batches of 4
    card = load_card(CaptionCard, JOBS / "caption_tiny.yaml", [
        f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={tmp_path}/runs",
        "run.name=exact", "run.max_failures=1", "data.max_val_images=4", f"data.cache_in_workers={str(cache).lower()}",
        "scaling.num_workers=1", "batch.global_batch_size=4", "batch.per_worker_batch_size=4", "caption.num_beams=1",
        "optim.warmup_steps=2", "schedule.max_steps=40", "validation.every_steps=4", "checkpoint.num_to_keep=1",
        "fault_drill={at_step: 34, rank: 0, kill: true, log_ids: true}",
    ])
    summary = run_training(card, controller_failure_limit=1)
    run = tmp_path / "runs" / "exact"
    assert (run / FAULT_MARKER).read_text().startswith("rank 0 killed at step 34")
    assert summary["steps"] == 40
    lines = [json.loads(line) for line in (run / "step_ids" / "rank0.jsonl").read_text().splitlines()]
    first_pid = lines[0]["pid"]
    killed = [line for line in lines if line["pid"] == first_pid]
    resumed = [line for line in lines if line["pid"] != first_pid]
    assert [line["step"] for line in killed] == list(range(1, 35))  # the worker died after its 34th step
    # Ray Train restores the last checkpoint its controller registered: normally step 32, later ones may still be
    # in flight when the worker dies on a loaded machine; every one from step 20 on lies inside epoch 1 (steps 19-36)
    restored = resumed[0]["step"] - 1
    assert restored in (20, 24, 28, 32)
    assert len({line["pid"] for line in resumed}) == 1 and [line["step"] for line in resumed] == list(range(restored + 1, 41))

    def examples(batch_lines: list[dict]) -> list[tuple[str, str]]:
        return [(image_id, texts[0]) for line in batch_lines for image_id, texts in line["examples"]]

    before = [line for line in killed if 19 <= line["step"] <= restored]
    after = [line for line in resumed if line["step"] <= 36]
    assert {line["epoch"] for line in before + after} == {1}
    train = Counter((r["image_id"], r["text"]) for r in read_text_rows(f"{data}/text.jsonl") if r["split"] == "train")
    assert Counter(examples(before) + examples(after)) == train and set(train.values()) == {1}  # each example once
    # the replayed steps took the very batches the killed run took after the checkpoint
    replayed = [line for line in resumed if line["step"] <= 34]
    assert examples(replayed) == examples([line for line in killed if line["step"] > restored])
    assert {line["epoch"] for line in resumed if line["step"] >= 37} == {2}
