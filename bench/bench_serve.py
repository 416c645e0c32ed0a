"""Serving figures (issue 7), measured on local Ray over loopback:

1. caption req/s, p50, p99 at concurrency 16 with `@serve.batch` (max_batch_size 8) vs batch size 1 (baseline),
   with the 64-wide tiny captioner (serving overhead dominates) or `--caption-shape base` (the real model's
   compute per request);
2. the bounded load test: 2,000 requests at concurrency 16 with one of two captioner replicas killed a third of
   the way in; errors counted exactly, the replacement replica observed;
3. retrieval on a 10,000-image synthetic gallery: query latency and recall@10 of two-stage search (n-gram
   candidates → cross-encoder re-ranking) vs brute force (cross-encoder over the whole gallery), plus the share
   of brute force's top-10 that two-stage recovers.

Models: tiny random-init dirs built from the synthetic data unless --caption-model / --retrieval-model name
trained ones (recall@10 against ground truth means something only with a trained retrieval model; the
brute-force agreement is the candidate stage's cost whatever the model).

    .venv/bin/python bench/bench_serve.py [--requests 2000] [--gallery 10000] [--queries 20]
        [--parts batching kill retrieval] [--caption-shape tiny|base] [--retrieval-model DIR]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.tiny_models
from common import git_commit, print_table, write_results  # noqa: E402

from mengzi_ray.synthetic import write_synthetic_dataset  # noqa: E402
from mengzi_ray.ray_runtime import start_local_ray  # noqa: E402
from mengzi_ray.serving.gallery import load_gallery  # noqa: E402
from mengzi_ray.serving.loadtest import LoadRun  # noqa: E402
from mengzi_ray.serving.retrieval import CrossEncoder, RetrievalEngine, SearchQuery  # noqa: E402
from mengzi_ray.serving.settings import GallerySection, ServeAppConfig  # noqa: E402
from tests.tiny_models import write_tiny_models  # noqa: E402

CONCURRENCY = 16
PARTS = ["batching", "kill", "retrieval"]
SHAPES = ["圆形", "正方形", "三角形"]


def app_config(caption_dir: str, retrieval_dir: str, features: str, max_batch_size: int, replicas: int) -> ServeAppConfig:
    model = {"num_cpus": 0.5, "max_batch_size": max_batch_size, "max_ongoing_requests": max(16, max_batch_size)}
    return ServeAppConfig.model_validate(
        {
            "captioner": {"model_dir": caption_dir, "min_replicas": replicas, "max_replicas": replicas, "batch_wait_timeout_s": 0.01, **model},
            "retriever": {"model_dir": retrieval_dir, "gallery": {"features": features, "max_images": 50}, **model},
            "detector": {**model, "model": {"backend": "given_boxes", "given_boxes_featurizer": "pixel_crops"}},
            "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 64},
            "auth_token_env": None,
            "default_num_beams": 3,
        }
    )


def caption_load(config: ServeAppConfig, body: dict, requests: int, kill_at: int | None) -> dict:
    """Deploy, warm up, run `requests` caption calls at CONCURRENCY; optionally kill a captioner replica."""
    import ray
    from ray import serve

    from mengzi_ray.serving.app import compose_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(compose_app(config), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/caption"
        LoadRun(url, body, total=2 * CONCURRENCY, concurrency=CONCURRENCY).start().wait()  # warm-up
        run = LoadRun(url, body, total=requests, concurrency=CONCURRENCY).start()
        killed, replaced = None, None
        if kill_at is not None:
            while run.done < kill_at:
                time.sleep(0.02)
            names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::bench#Captioner#"))
            killed = names[0]
            ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
        report = run.wait()
        if killed is not None:
            for _ in range(600):
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::bench#Captioner#")]
                states = serve.status().applications["bench"].deployments["Captioner"].replica_states
                if killed not in names and states.get("RUNNING") == config.captioner.min_replicas:
                    replaced = True
                    break
                time.sleep(0.5)
        return {**report.summary(), "killed_replica": killed, "replaced": replaced}
    finally:
        serve.shutdown()


def retrieval_bench(retrieval_dir: str, features: str, texts: str, queries: int, candidate_counts: list[int]) -> list[dict]:
    gallery = load_gallery(GallerySection(features=features, texts=texts))
    encoder = CrossEncoder(retrieval_dir, chunk=512)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(gallery.captions), size=queries, replace=False)
    wanted = [(gallery.captions[i], gallery.index_of[gallery.caption_image_ids[i]]) for i in picks]
    # The synthetic grammar is small, so in a large gallery many images carry the very same caption: any of them
    # is a right answer, and "the" source image is one of many equals.
    described_by: dict[str, set[int]] = {}
    for text, image_id in zip(gallery.captions, gallery.caption_image_ids):
        described_by.setdefault(text, set()).add(gallery.index_of[image_id])
    brute_top: list[list[int]] = []
    rows = []
    for candidates in [None, *candidate_counts]:
        engine = RetrievalEngine(encoder, gallery, candidates)
        seconds, hits_at_10, described_at_10, agreement = [], 0, 0, []
        for q, (text, truth) in enumerate(wanted):
            start = time.perf_counter()
            (hits,) = engine.search([SearchQuery(k=10, text=text)])
            seconds.append(time.perf_counter() - start)
            top = [h.index for h in hits]
            hits_at_10 += truth in top
            described_at_10 += bool(described_by[text] & set(top))
            if candidates is None:
                brute_top.append(top)
            else:
                agreement.append(len(set(top) & set(brute_top[q])) / 10)
        rows.append(
            {
                "method": "brute force" if candidates is None else f"two-stage, {candidates} candidates",
                "candidates": candidates or len(gallery),
                "p50_ms": float(np.median(seconds) * 1000),
                "mean_ms": float(np.mean(seconds) * 1000),
                "recall@10": hits_at_10 / len(wanted),
                "described@10": described_at_10 / len(wanted),
                "images_per_query_text": float(np.mean([len(described_by[t]) for t, _ in wanted])),
                "top10_agreement_with_brute": float(np.mean(agreement)) if agreement else 1.0,
            }
        )
    return rows


def base_shaped_captioner(tiny_dir: Path, out_dir: Path) -> str:
    """A random-init captioner of Mengzi-BERT-base's shape (768 hidden, 12 layers) with the tiny vocab and layout:
    the compute per request of the real model, which the 64-wide tiny one lacks."""
    from mengzi_ray.modeling import OscarConfig, OscarForCaptioning

    config = OscarConfig.load(tiny_dir, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    return str(OscarForCaptioning(config).save_pretrained(out_dir, vocab_file=tiny_dir / "vocab.txt"))


def caption_part(caption_dir: str, retrieval_dir: str, features: str, body: dict, requests: int, parts: list[str]) -> dict:
    """Figures 1 and 2 on a local Ray: batched vs batch size 1 ("batching"), two replicas with one killed mid-run
    ("kill")."""
    import ray

    start_local_ray(num_cpus=4, include_dashboard=False)
    runs: dict[str, dict] = {}
    try:
        if "batching" in parts:
            runs["batch_size_1"] = caption_load(app_config(caption_dir, retrieval_dir, features, 1, 1), body, requests, None)
            runs["batched"] = caption_load(app_config(caption_dir, retrieval_dir, features, 8, 1), body, requests, None)
        if "kill" in parts:
            runs["replica_killed"] = caption_load(app_config(caption_dir, retrieval_dir, features, 8, 2), body, requests, requests // 3)
    finally:
        ray.shutdown()

    names = {"batch_size_1": "batch size 1 (baseline)", "batched": "@serve.batch max 8", "replica_killed": "max 8, 2 replicas, 1 killed"}
    print(f"\ncaption over HTTP: {requests} requests, concurrency {CONCURRENCY}, beams 3, precomputed regions, model {caption_dir}")
    print_table(
        ["setting", "req/s", "p50 ms", "p99 ms", "mean batch", "errors"],
        [
            [names[key], f"{r['req_per_s']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['mean_batch_size'] or 0:.2f}", r["errors"] or 0]
            for key, r in runs.items()
        ],
    )
    if "batching" in parts:
        batched, single = runs["batched"], runs["batch_size_1"]
        print(f"throughput ratio batched / baseline: {batched['req_per_s'] / single['req_per_s']:.2f}x; "
              f"p99 ratio: {batched['p99_ms'] / single['p99_ms']:.2f}x")
    if "kill" in parts:
        killed = runs["replica_killed"]
        print(f"killed replica {killed['killed_replica']} replaced: {killed['replaced']}; errors during the kill run: {killed['errors'] or 0}")
    return runs


def retrieval_part(work: Path, retrieval_dir: str, gallery: int, queries: int, candidates: list[int]) -> list[dict]:
    """Figure 3: brute force vs two-stage on a fresh synthetic gallery of `gallery` images."""
    start = time.perf_counter()
    ds = write_synthetic_dataset(work / "gallery", num_train=0, num_val=gallery, seed=11)
    print(f"\ngallery of {gallery} synthetic images written in {time.perf_counter() - start:.0f}s")
    rows = retrieval_bench(retrieval_dir, str(ds.features_path), str(ds.text_path), queries, candidates)
    brute = rows[0]
    print(f"\nretrieval: {gallery}-image gallery, {queries} caption queries, top-10 (in-process engine, no HTTP)")
    print_table(
        ["method", "candidates", "p50 ms/query", "speed-up", "recall@10", "described@10", "top-10 agreement with brute force"],
        [
            [r["method"], r["candidates"], f"{r['p50_ms']:.0f}", f"{brute['p50_ms'] / r['p50_ms']:.1f}x", f"{r['recall@10']:.2f}",
             f"{r['described@10']:.2f}", f"{r['top10_agreement_with_brute']:.2f}"]
            for r in rows
        ],
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--caption-model", help="trained captioner dir (default: tiny random init)")
    parser.add_argument("--caption-shape", choices=["tiny", "base"], default="tiny",
                        help="random-init captioner shape when no --caption-model: tiny (64 wide) or base (768, 12 layers)")
    parser.add_argument("--retrieval-model", help="trained retrieval dir (default: tiny random init)")
    parser.add_argument("--work", help="scratch dir (default: a temp dir)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    args = parser.parse_args()

    commit = git_commit()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_serve_"))
    # The synthetic captions share one small grammar, so a vocab from 100 scenes covers any gallery of them.
    small = write_synthetic_dataset(work / "small", num_train=0, num_val=100, seed=5)
    caption_dir, retrieval_dir = write_tiny_models(small.text_path, SHAPES, work / "models")
    base_shaped = args.caption_model is None and args.caption_shape == "base"
    if base_shaped:
        caption_dir = base_shaped_captioner(caption_dir, work / "models" / "caption_base")
    caption_dir = args.caption_model or str(caption_dir)
    retrieval_dir = args.retrieval_model or str(retrieval_dir)
    row = pq.read_table(small.features_path).slice(0, 1).to_pylist()[0]
    body = {"regions": {"features": row["features"], "tags": row["tags"]}, "num_beams": 3}

    results: dict = {}
    if {"batching", "kill"} & set(args.parts):
        results["caption"] = caption_part(caption_dir, retrieval_dir, str(small.features_path), body, args.requests, args.parts)
    if "retrieval" in args.parts:
        results["retrieval"] = retrieval_part(work, retrieval_dir, args.gallery, args.queries, args.candidates)
    settings = {
        "requests": args.requests, "concurrency": CONCURRENCY, "num_beams": 3, "gallery": args.gallery,
        "queries": args.queries, "caption_model": args.caption_model or f"{args.caption_shape}-shaped random init",
        "retrieval_model": args.retrieval_model or "tiny random init", "parts": args.parts,
    }
    name = "bench_serve" if set(args.parts) == set(PARTS) else "bench_serve_" + "_".join(args.parts)
    if base_shaped:
        name += "_base"
    print(f"\nwrote {write_results(name, torch.device('cpu'), commit, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
