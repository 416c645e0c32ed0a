"""Extraction throughput: the Ray Data pipeline vs the bare detector loop over the same images; 1 vs 2 actors;
peak memory of the Ray processes at N and 10N images.

Bare loop: one process decodes every image up front (not timed), builds the detector (not timed), then times
detector.detect over batches of the card's batch_size, with the torch threads of one actor (actors.num_cpus). Pipeline: run_extract end to end on local Ray (listing,
read, decode tasks, actor start-up including the model build, detection, Parquet writes), once with
ActorPoolStrategy(min_size=1, max_size=1) and once with 2 actors. Both use the tiny CPU card
(jobs/extract_tiny.yaml: random-init narrow ResNet-50 C4, resize 128/200, 10 regions) on the synthetic 96x96 set
(`--images`, default 200). The detector actors log when each batch starts and ends, which splits a run into
start-up (run_extract's start to the first batch reaching an actor: listing, planning, actor start and model
build, first decode) and steady state (first batch to the end, writes included); the table gives the raw
efficiency (whole run) and the start-up-excluded one (steady rate / bare rate), and the actors' busy fraction of
the steady part (1.0: never waiting for decoded images).

`--rss`: instead, the pipeline with 1 actor at `--images` and 10x as many, each on a fresh local Ray, while a
thread samples every 0.2 s the resident set (psutil RSS) of every process the driver started (GCS, raylet,
workers, actors: Ray's object store is shared memory and counts in each process that maps it) and reports the
peak of their sum and the peak of any single one; the ratio 10N / N should stay near 1 (streaming, not holding
a chunk's results).

Base-resolution case (`--case base`): the bare detector loop with a full-width ResNet-50 C4 (random weights) at
VinVL's test size (600/1000, 300 proposals, 1595 classes) over scikit-image's photographs, batches of 1 and 2,
fp32 and (on a GPU) bf16 autocast: images/s per device.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
from common import REPO_ROOT, git_commit, init_local_ray, print_table, timed_batches, write_results

from mengzi_ray.config import load_card
from mengzi_ray.features.card import DetectorSection, ExtractCard
from mengzi_ray.features.decode import decode_image
from mengzi_ray.features.detectors.base import build_detector
from mengzi_ray.features.extract import DetectorActor, run_extract
from mengzi_ray.synthetic import write_synthetic_dataset

SCRIPT = "bench_extract"
IMAGES = 200
RAY_CPUS = 4
RSS_FACTOR = 10
RSS_PERIOD_S = 0.2


def card_for(images: Path, output: Path, actors: int) -> ExtractCard:
    return load_card(ExtractCard, REPO_ROOT / "jobs" / "extract_tiny.yaml", [
        f"input.uri={images}", f"output={output}", f"actors.min_size={actors}", f"actors.max_size={actors}",
    ])


def bare_loop(images: Path, card: ExtractCard) -> dict[str, float]:
    """images/s of detector.detect in this process, with as many torch threads as an actor gets (Ray sets
    OMP_NUM_THREADS to the actor's num_cpus), so the ratio is the pipeline's cost, not a thread count's."""
    decoded = [decode_image(p.read_bytes()) for p in sorted(images.rglob("*.png"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(card.actors.num_cpus)))
    start = time.perf_counter()
    detector = build_detector(card.detector)
    build = time.perf_counter() - start
    size = card.actors.batch_size
    start = time.perf_counter()
    for first in range(0, len(decoded), size):
        detector.detect(decoded[first : first + size])
    seconds = time.perf_counter() - start
    result = {"images_per_s": round(len(decoded) / seconds, 2), "seconds": round(seconds, 2),
              "build_s": round(build, 2), "torch_threads": torch.get_num_threads()}
    torch.set_num_threads(threads)
    return result


def pipeline_run(images: Path, output: Path, actors: int, count: int) -> dict[str, float]:
    """run_extract with `actors` detector actors, split into start-up and steady state (module docstring)."""
    log = output.with_suffix(".batches.jsonl")
    start = time.time()
    summary = run_extract(card_for(images, output, actors), actor_cls=timed_batches(DetectorActor, log))
    end = time.time()
    assert summary["done"] == count, summary
    batches = [json.loads(line) for line in log.read_text().splitlines()]
    first = min(b["start"] for b in batches)
    busy = sum(b["end"] - b["start"] for b in batches)
    return {"images_per_s": round(count / (end - start), 3), "seconds": round(end - start, 2),
            "startup_s": round(first - start, 2), "steady_images_per_s": round(count / (end - first), 3),
            "actor_busy": round(busy / actors / (end - first), 3), "summary_images_per_s": summary["images_per_s"]}


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
    parser.add_argument("--images", type=int, default=IMAGES, help="synthetic images of the tiny case (N of --rss)")
    parser.add_argument("--rss", action="store_true", help="peak RSS of the Ray processes at N and 10N images")
    args = parser.parse_args()
    if args.rss:
        rss_case(args.images)
        return
    if args.case in ("base", "all"):
        base = base_resolution()
        print_table(["R50-C4 600/1000, bare loop", "images/s"], [[k, v["images_per_s"]] for k, v in base.items()])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(write_results(f"{SCRIPT}_base", device, git_commit(),
                            {"images": BASE_IMAGES, "photos": BASE_PHOTOS, "min_size": 600, "max_size": 1000,
                             "proposals": 300, "torch_threads": torch.get_num_threads()}, base))
    if args.case in ("tiny", "all"):
        tiny_pipeline(args.images)


def tiny_pipeline(count: int) -> None:
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = write_synthetic_dataset(root / "syn", num_train=count, num_val=0).images_dir
        bare = bare_loop(images, card_for(images, root / "unused", 1))
        init_local_ray(RAY_CPUS)
        pipeline = {actors: pipeline_run(images, root / f"out{actors}", actors, count) for actors in (1, 2)}
        ray.shutdown()
    one, two = pipeline[1], pipeline[2]
    rows = [
        ["bare detector loop (1 process)", bare["images_per_s"], "", "", "1.00 (baseline)"],
        ["pipeline, 1 actor", one["images_per_s"], one["steady_images_per_s"], one["startup_s"],
         f"{one['images_per_s'] / bare['images_per_s']:.2f} raw, "
         f"{one['steady_images_per_s'] / bare['images_per_s']:.2f} start-up excluded (efficiency)"],
        ["pipeline, 2 actors", two["images_per_s"], two["steady_images_per_s"], two["startup_s"],
         f"{two['images_per_s'] / one['images_per_s']:.2f} (vs 1 actor)"],
    ]
    print_table(["what", "images/s", "steady images/s", "start-up s", "ratio"], rows)
    results = {"bare": bare, "pipeline_1_actor": one, "pipeline_2_actors": two,
               "efficiency": round(one["images_per_s"] / bare["images_per_s"], 3),
               "efficiency_startup_excluded": round(one["steady_images_per_s"] / bare["images_per_s"], 3),
               "scaling_2_vs_1": round(two["images_per_s"] / one["images_per_s"], 3)}
    settings = {"images": count, "image_size": 96, "card": "jobs/extract_tiny.yaml", "ray_num_cpus": RAY_CPUS}
    print(write_results(SCRIPT, torch.device("cpu"), commit, settings, results))


class RssSampler(threading.Thread):
    """Samples the RSS of every descendant process of this one (module docstring) until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_sum = self.peak_one = 0
        self.processes = 0
        self.largest = ""  # the process that reached peak_one (its Ray name, e.g. ray::MapWorker(...))
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil  # Ray vendors it (ray/thirdparty_files), importable once ray is

        me = psutil.Process(os.getpid())
        while not self._stop_event.wait(RSS_PERIOD_S):
            sizes = []
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    if rss > self.peak_one:
                        self.peak_one, self.largest = rss, child.cmdline()[0][:80]
                except psutil.Error:  # a worker that exited between listing and reading
                    continue
                sizes.append(rss)
            self.peak_sum = max(self.peak_sum, sum(sizes))
            self.processes = max(self.processes, len(sizes))

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        return {"peak_sum_mb": round(self.peak_sum / 2**20, 1), "peak_process_mb": round(self.peak_one / 2**20, 1),
                "processes": self.processes, "largest": self.largest}


def rss_case(count: int) -> None:
    commit = git_commit()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in (count, RSS_FACTOR * count):
            images = write_synthetic_dataset(root / f"syn{n}", num_train=n, num_val=0).images_dir
            init_local_ray(RAY_CPUS)
            sampler = RssSampler()
            sampler.start()
            run = pipeline_run(images, root / f"out{n}", 1, n)
            out[n] = {**sampler.stop(), **run}
            ray.shutdown()
    small, large = out[count], out[RSS_FACTOR * count]
    rows = [[n, r["peak_sum_mb"], r["peak_process_mb"], r["largest"], r["processes"], r["images_per_s"]]
            for n, r in out.items()]
    print_table(["images", "peak sum RSS MB", "peak process RSS MB", "largest", "processes", "images/s"], rows)
    ratio = {"sum": round(large["peak_sum_mb"] / small["peak_sum_mb"], 3),
             "process": round(large["peak_process_mb"] / small["peak_process_mb"], 3)}
    print(f"peak RSS {RSS_FACTOR}N / N: sum {ratio['sum']:.2f}x, largest process {ratio['process']:.2f}x")
    settings = {"images": [count, RSS_FACTOR * count], "image_size": 96, "card": "jobs/extract_tiny.yaml",
                "ray_num_cpus": RAY_CPUS, "sample_period_s": RSS_PERIOD_S,
                "measure": "psutil RSS of every descendant process of the driver"}
    print(write_results(f"{SCRIPT}_rss", torch.device("cpu"), commit, settings,
                        {"runs": {str(n): r for n, r in out.items()}, "ratio_10n_vs_n": ratio}))


if __name__ == "__main__":
    main()
