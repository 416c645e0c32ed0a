"""Extraction throughput: the Ray Data pipeline vs the bare detector loop over the same images; 1 vs 2 actors.

Bare loop: one process decodes every image up front (not timed), builds the detector (not timed), then times
detector.detect over batches of the card's batch_size. Pipeline: run_extract end to end on local Ray (listing,
read, decode tasks, actor start-up including the model build, detection, Parquet writes), images/s from its
summary, once with ActorPoolStrategy(min_size=1, max_size=1) and once with 2 actors. Both use the tiny CPU card
(jobs/extract_tiny.yaml: random-init narrow ResNet-50 C4, resize 128/200, 10 regions) on the synthetic 96x96 set.
The efficiency ratio counts actor start-up against the pipeline: with few images it is dominated by it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import ray
import torch
from common import REPO_ROOT, git_commit, print_table, write_results

from mengzi_ray.config import load_card
from mengzi_ray.datasets import write_synthetic_dataset
from mengzi_ray.features.card import ExtractCard
from mengzi_ray.features.decode import decode_image
from mengzi_ray.features.detectors.base import build_detector
from mengzi_ray.features.extract import run_extract

SCRIPT = "bench_extract"
IMAGES = 96
RAY_CPUS = 4


def card_for(images: Path, output: Path, actors: int) -> ExtractCard:
    return load_card(ExtractCard, REPO_ROOT / "jobs" / "extract_tiny.yaml", [
        f"input.uri={images}", f"output={output}", f"actors.min_size={actors}", f"actors.max_size={actors}",
    ])


def bare_loop(images: Path, card: ExtractCard) -> dict[str, float]:
    decoded = [decode_image(p.read_bytes()) for p in sorted(images.rglob("*.png"))]
    start = time.perf_counter()
    detector = build_detector(card.detector)
    build = time.perf_counter() - start
    size = card.actors.batch_size
    start = time.perf_counter()
    for first in range(0, len(decoded), size):
        detector.detect(decoded[first : first + size])
    seconds = time.perf_counter() - start
    return {"images_per_s": round(len(decoded) / seconds, 2), "seconds": round(seconds, 2),
            "build_s": round(build, 2)}


def main() -> None:
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_synthetic_dataset(root / "syn", num_train=IMAGES, num_val=0).images_dir
        bare = bare_loop(images, card_for(images, root / "unused", 1))
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)
        pipeline = {}
        for actors in (1, 2):
            summary = run_extract(card_for(images, root / f"out{actors}", actors))
            assert summary["done"] == IMAGES, summary
            pipeline[actors] = {"images_per_s": summary["images_per_s"], "seconds": summary["seconds"]}
        ray.shutdown()
    rows = [
        ["bare detector loop (1 process)", bare["images_per_s"], "1.00 (baseline)"],
        ["pipeline, 1 actor", pipeline[1]["images_per_s"],
         f"{pipeline[1]['images_per_s'] / bare['images_per_s']:.2f} (efficiency)"],
        ["pipeline, 2 actors", pipeline[2]["images_per_s"],
         f"{pipeline[2]['images_per_s'] / pipeline[1]['images_per_s']:.2f} (vs 1 actor)"],
    ]
    print_table(["what", "images/s", "ratio"], rows)
    results = {"bare": bare, "pipeline_1_actor": pipeline[1], "pipeline_2_actors": pipeline[2],
               "efficiency": round(pipeline[1]["images_per_s"] / bare["images_per_s"], 3),
               "scaling_2_vs_1": round(pipeline[2]["images_per_s"] / pipeline[1]["images_per_s"], 3)}
    settings = {"images": IMAGES, "image_size": 96, "card": "jobs/extract_tiny.yaml", "ray_num_cpus": RAY_CPUS}
    print(write_results(SCRIPT, torch.device("cpu"), commit, settings, results))


if __name__ == "__main__":
    main()
