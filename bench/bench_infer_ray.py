"""Inference on Ray Data vs the in-process loop: caption inference at IMAGES images and retrieval pair scoring at
N and 2N gallery images (per-pair cost should stay flat).

* Caption: `predict_captions` (Ray Data map_batches over a 1-actor pool, 1 CPU) vs `Captioner.caption_records` in this
  process with torch limited to 1 thread (what the actor gets: Ray sets OMP_NUM_THREADS to its CPUs). Ray Data's
  start-up (actor start, model load, first block: the call's start to the actor's first batch, from the actor's
  batch timestamps) is reported apart from its steady rate (IMAGES / (return − first batch start)).
* Pairs: `score_pairs` (Ray Data, 1 actor) vs `PairScorer.score` over the whole pair range in this process (1
  thread), on the cross-image pair space of N and 2N images (N·3 captions each: 4× the pairs). Seconds per pair
  at both sizes and their ratio (1.0 = flat), end to end and steady (a PAIRS_SMALL-image run's time and pairs
  subtracted: the actor start-up and model load).

Tiny random-init models (throughput does not depend on the weights); Ray embedded with 4 logical CPUs.
`python bench/bench_infer_ray.py [--images 500] [--pairs-images 40]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from bench_eval import CAPTIONS, MAX_GEN, _tiny_model  # the same tiny models and caption budget
from common import git_commit, init_local_ray, pick_device, print_table, timed_batches, write_results
from mengzi_ray.data.records import load_image_records
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.evaluation.caption_inference import CaptionPredictor, predict_captions
from mengzi_ray.evaluation.retrieval_eval import CrossPairs, PairScorer, build_gallery, score_pairs
from mengzi_ray.modeling import OscarForCaptioning, OscarForRetrieval
from mengzi_ray.inference import Captioner
from mengzi_ray.text import build_vocab, write_vocab

SCRIPT = "bench_infer_ray"
PAIRS_SMALL = 4  # images of the pair scoring start-up run
NUM_BEAMS, CAPTION_BATCH = 2, 16
PAIR_BATCH = 64
PAIR_CHUNK = 1024


def bench_caption(model_dir: Path, features: Path, val: list, log: Path) -> dict:
    """Ray Data start-up = the call's start to the actor's first batch (actor start, model load, read); steady =
    the images from there to the call's return (the results' trip to the driver included)."""
    ids = [r.image_id for r in val]
    kwargs = {"num_beams": NUM_BEAMS, "max_gen_length": MAX_GEN, "num_actors": 1, "batch_size": CAPTION_BATCH}
    start = time.time()
    predict_captions(str(features), str(model_dir), ids, predictor_cls=timed_batches(CaptionPredictor, log), **kwargs)
    end = time.time()
    first = min(json.loads(line)["start"] for line in log.read_text().splitlines())
    captioner = Captioner.from_model_dir(str(model_dir), "cpu", max_gen_length=MAX_GEN, batch_size=CAPTION_BATCH)
    begin = time.perf_counter()
    captioner.caption_records(val, num_beams=NUM_BEAMS)
    t_local = time.perf_counter() - begin
    steady = len(ids) / (end - first)
    local = len(ids) / t_local
    return {
        "images": len(ids), "in_process_s": t_local, "in_process_images_per_s": local, "ray_end_to_end_s": end - start,
        "ray_steady_images_per_s": steady, "ray_startup_s": first - start,
        "steady_ratio": steady / local, "end_to_end_ratio": (len(ids) / (end - start)) / local,
    }


def _ray_pairs(model_dir: Path, val: list, n: int) -> tuple[float, CrossPairs, object, np.ndarray]:
    """(seconds, pairs, gallery, scores) of scoring the first n images' cross grid on Ray Data, start-up included."""
    chosen = val[:n]
    refs = {r.image_id: r.texts for r in chosen}
    gallery = build_gallery(list(refs), refs, {r.image_id: (r.features, r.od_labels, "") for r in chosen}, CAPTIONS)
    pairs = CrossPairs(gallery.num_images, gallery.num_texts)
    start = time.perf_counter()
    scores = score_pairs(str(model_dir), gallery, pairs, num_actors=1, chunk_size=PAIR_CHUNK, batch_size=PAIR_BATCH)
    return time.perf_counter() - start, pairs, gallery, scores


def bench_pairs(model_dir: Path, val: list, n: int, startup: tuple[float, int]) -> dict:
    """Cross grid of n images on Ray Data vs in-process; steady µs/pair subtracts the `startup` run's (seconds,
    pairs) as the caption part does (same actor start-up and model load, few pairs)."""
    t_ray, pairs, gallery, on_ray = _ray_pairs(model_dir, val, n)
    scorer = PairScorer(str(model_dir), gallery, pairs, PAIR_BATCH, False)
    start = time.perf_counter()
    _, local = scorer.score(0, pairs.num_pairs)
    t_local = time.perf_counter() - start
    assert (on_ray == local).all(), "Ray Data scores differ from the in-process loop"
    steady_us = 1e6 * (t_ray - startup[0]) / (pairs.num_pairs - startup[1])
    local_us = 1e6 * t_local / pairs.num_pairs
    return {
        "images": n, "pairs": pairs.num_pairs, "ray_s": t_ray, "in_process_s": t_local,
        "ray_us_per_pair": 1e6 * t_ray / pairs.num_pairs, "ray_steady_us_per_pair": steady_us,
        "in_process_us_per_pair": local_us, "ratio": t_local / t_ray, "steady_ratio": local_us / steady_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--pairs-images", type=int, default=40)
    args = parser.parse_args()
    if args.pairs_images < 4 * PAIRS_SMALL:
        parser.error(f"--pairs-images must be >= {4 * PAIRS_SMALL}: the steady rate subtracts a start-up run of that size")
    commit = git_commit()
    device = pick_device()
    torch.set_num_threads(1)  # the baseline gets what one 1-CPU actor gets
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        num_val = max(args.images, 2 * args.pairs_images)
        data = write_synthetic_dataset(root / "data", num_train=0, num_val=num_val, seed=0)
        val = load_image_records(data.features_path, data.text_path, "val")
        write_vocab(build_vocab([t for r in val for t in r.texts] + [r.od_labels for r in val]), root / "vocab.txt")
        captioner = _tiny_model(OscarForCaptioning, root / "vocab.txt", root / "captioner")
        retriever = _tiny_model(OscarForRetrieval, root / "vocab.txt", root / "retriever")
        init_local_ray(num_cpus=4)
        try:
            caption = bench_caption(captioner, data.features_path, val[: args.images], root / "batches.jsonl")
            startup_s, startup_pairs, _, _ = _ray_pairs(retriever, val, PAIRS_SMALL)
            pairs = [bench_pairs(retriever, val, n, (startup_s, startup_pairs.num_pairs))
                     for n in (args.pairs_images, 2 * args.pairs_images)]
        finally:
            ray.shutdown()
    print_table(
        [f"caption (beam {NUM_BEAMS})", "images", "in-process img/s", "Ray steady img/s", "Ray start-up s", "steady ratio", "end-to-end ratio"],
        [[caption["images"], caption["images"], f"{caption['in_process_images_per_s']:.2f}", f"{caption['ray_steady_images_per_s']:.2f}",
          f"{caption['ray_startup_s']:.1f}", f"{caption['steady_ratio']:.2f}", f"{caption['end_to_end_ratio']:.2f}"]],
    )
    print()
    print_table(
        ["pair scoring", "pairs", "in-process µs/pair", "Ray Data µs/pair", "steady µs/pair", "ratio", "steady ratio"],
        [[f"{p['images']} images", p["pairs"], f"{p['in_process_us_per_pair']:.1f}", f"{p['ray_us_per_pair']:.1f}",
          f"{p['ray_steady_us_per_pair']:.1f}", f"{p['ratio']:.2f}", f"{p['steady_ratio']:.2f}"] for p in pairs],
    )
    flat = pairs[1]["ray_steady_us_per_pair"] / pairs[0]["ray_steady_us_per_pair"]
    print(f"\nRay Data steady per-pair cost 2N / N: {flat:.2f} (start-up: {startup_s:.1f} s for {PAIRS_SMALL} images)")
    settings = {"images": args.images, "pairs_small": PAIRS_SMALL, "pairs_images": args.pairs_images, "num_beams": NUM_BEAMS,
                "caption_batch": CAPTION_BATCH, "pair_batch": PAIR_BATCH, "pair_chunk": PAIR_CHUNK, "threads": 1,
                "model": "hidden 128, 2 layers, random init", "ray_num_cpus": 4}
    path = write_results(SCRIPT, device, commit, settings, {"caption": caption, "pairs": pairs, "per_pair_2n_over_n": flat})
    print(f"written {path}")


if __name__ == "__main__":
    main()
