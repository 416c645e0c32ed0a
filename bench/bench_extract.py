"""Extraction throughput: the Ray Data pipeline vs the bare detector loop over the same images; 1 vs 2 actors.

Bare loop: one process decodes every image up front (not timed), builds the detector (not timed), then times
detector.detect over batches of the card's batch_size. Pipeline: run_extract end to end on local Ray (listing,
read, decode tasks, actor start-up including the model build, detection, Parquet writes), images/s from its
summary, once with ActorPoolStrategy(min_size=1, max_size=1) and once with 2 actors. Both use the tiny CPU card
(jobs/extract_tiny.yaml: random-init narrow ResNet-50 C4, resize 128/200, 10 regions) on the synthetic 96x96 set.
The efficiency ratio counts actor start-up against the pipeline: with few images it is dominated by it.

Base-resolution case (`--case base`): the bare detector loop with a full-width ResNet-50 C4 (random weights) at
VinVL's test size (600/1000, 300 proposals, 1595 classes) over scikit-image's photographs, batches of 1 and 2,
fp32 and (on a GPU) bf16 autocast: images/s per device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import REPO_ROOT, git_commit, print_table, write_results

from mengzi_ray.config import load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.features.card import DetectorSection, ExtractCard
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


BASE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
BASE_IMAGES = 8


def base_resolution() -> dict[str, dict[str, float]]:
    """images/s of the bare R50-C4 detector at VinVL's test size, per batch size and precision (see docstring)."""
    import numpy as np
    from skimage import data

    photos = [np.asarray(getattr(data, name)()) for name in BASE_PHOTOS]
    images = [photos[i % len(photos)] for i in range(BASE_IMAGES)]
    out = {}
    precisions = ("none", "bf16") if torch.cuda.is_available() else ("none",)
    for autocast in precisions:
        detector = build_detector(DetectorSection(
            allow_random_weights=True, depth=50, groups=1, width_per_group=64, stride_in_1x1=True,
            input_format="bgr255", pixel_mean=[103.53, 116.28, 123.675], pixel_std=[1.0, 1.0, 1.0],
            test_min_size=600, test_max_size=1000, rpn_pre_nms_top_n=6000, rpn_post_nms_top_n=300,
            num_classes=1595, autocast=autocast))
        detector.detect(images[:1])  # warm-up (kernel selection, allocator)
        for batch in (1, 2):
            start = time.perf_counter()
            for first in range(0, len(images), batch):
                detector.detect(images[first : first + batch])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out[f"{autocast}_batch{batch}"] = {"images_per_s": round(len(images) / (time.perf_counter() - start), 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["tiny", "base", "all"], default="all")
    case = parser.parse_args().case
    if case in ("base", "all"):
        base = base_resolution()
        print_table(["R50-C4 600/1000, bare loop", "images/s"], [[k, v["images_per_s"]] for k, v in base.items()])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(write_results(f"{SCRIPT}_base", device, git_commit(),
                            {"images": BASE_IMAGES, "photos": BASE_PHOTOS, "min_size": 600, "max_size": 1000,
                             "proposals": 300, "torch_threads": torch.get_num_threads()}, base))
    if case in ("tiny", "all"):
        tiny_pipeline()


def tiny_pipeline() -> None:
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
