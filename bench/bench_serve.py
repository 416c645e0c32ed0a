"""Serving figures, measured on local Ray over loopback:

1. caption req/s, p50, p99 at concurrency 16 with `@serve.batch` vs batch size 1 (baseline), precomputed regions
   sent in the compact base64 form, beam 3, with the 64-wide tiny captioner (serving overhead dominates) or
   `--caption-shape base` (the real model's compute per request); the batch-size histogram of each run;
2. the same over the image-upload path: a PNG per request through the ingress's decoding, the Detector deployment
   (the tiny random-weight torchvision C4 detector of serve/config.yaml = jobs/extract_tiny.yaml's) and the
   Captioner, both batched or both at batch size 1; plus each model stage's in-process cost per item at batch sizes
   1, 4 and 8 (the slower stage bounds the path);
3. the bounded load test: `--requests` at concurrency 16 with one of two captioner replicas killed a third of
   the way in; errors counted exactly, the replacement replica observed;
4. retrieval on a 10,000-image synthetic gallery: query latency and recall@10 of two-stage search (n-gram
   candidates → cross-encoder re-ranking) vs brute force (cross-encoder over the whole gallery), plus the share
   of brute force's top-10 that two-stage recovers.

Models: tiny random-init dirs built from the synthetic data unless --caption-model / --retrieval-model name
trained ones (recall@10 against ground truth means something only with a trained retrieval model; the
brute-force agreement is the candidate stage's cost whatever the model).

    .venv/bin/python bench/bench_serve.py [--requests 200] [--gallery 10000] [--queries 20]
        [--parts batching upload kill retrieval] [--caption-shape tiny|base] [--max-batch-size 8]
        [--batch-wait-s 0.05] [--retrieval-model DIR]
"""

from __future__ import annotations

import argparse
import base64
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
from common import git_commit, init_local_ray, print_table, write_results  # noqa: E402

from mengzi_ray.synthetic import write_synthetic_dataset  # noqa: E402
from mengzi_ray.serving.gallery import load_gallery  # noqa: E402
from mengzi_ray.serving.loadtest import LoadRun  # noqa: E402
from mengzi_ray.inference import MatchScorer  # noqa: E402
from mengzi_ray.serving.retrieval import RetrievalEngine, SearchQuery  # noqa: E402
from mengzi_ray.serving.settings import GallerySection, ServeAppConfig  # noqa: E402
from tests.tiny_models import write_tiny_models  # noqa: E402

CONCURRENCY = 16
PARTS = ["batching", "upload", "kill", "retrieval"]
SHAPES = ["圆形", "正方形", "三角形"]
ROOT = Path(__file__).resolve().parents[1]
CALL_TIMEOUT_S = 600.0
GIVEN_BOXES = {"backend": "given_boxes", "given_boxes_featurizer": "pixel_crops"}


def local_detector() -> dict:
    """The detector model section of serve/config.yaml (the tiny random-weight torchvision C4 of the local demo)."""
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    return config["applications"][0]["args"]["detector"]["model"]


def app_config(caption_dir: str, retrieval_dir: str, features: str, max_batch_size: int, replicas: int, *,
               batch_wait_s: float, detector: dict | None = None) -> ServeAppConfig:
    """Captioner (and Detector) batching at `max_batch_size`; the Detector is `detector` (a DetectorSection dict)
    or given boxes with pixel crops (unused by precomputed-region requests)."""
    model = {"num_cpus": 0.5, "max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_s,
             "max_ongoing_requests": max(CONCURRENCY, max_batch_size)}
    return ServeAppConfig.model_validate(
        {
            "captioner": {"model_dir": caption_dir, "min_replicas": replicas, "max_replicas": replicas, **model},
            "retriever": {"model_dir": retrieval_dir, "gallery": {"features": features, "max_images": 50}, **model},
            "detector": {**model, "model": detector or GIVEN_BOXES},
            "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 64},
            "allow_anonymous": True,
            "auth_token_env": "MENGZI_BENCH_NO_TOKEN",
            # batch size 1 on a base-shaped model queues 16 requests × seconds each: no 503 from the model-call limit
            "limits": {"max_pixels": 16_000_000, "call_timeout_s": CALL_TIMEOUT_S},
            "default_num_beams": 3,
        }
    )


def regions_body(row: dict) -> dict:
    """A caption request with a feature row's regions in the compact form (base64 little-endian float32)."""
    feats = np.asarray(row["features"], dtype="<f4")
    encoded = base64.b64encode(feats.tobytes()).decode("ascii")
    return {"regions": {"features_b64": encoded, "shape": list(feats.shape), "tags": row["tags"]}, "num_beams": 3}


def upload_body(image_path: Path) -> dict:
    """A caption request carrying an image file (base64 in JSON, as the demo page's upload)."""
    return {"image_base64": base64.b64encode(image_path.read_bytes()).decode("ascii"), "num_beams": 3}


def replica_batches(deployment: str) -> dict[str, int]:
    """The batch-size histogram of the first replica of `deployment` in the app (model calls per batch size)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="bench").info.remote().result()["batch_sizes"]


def start_serve() -> int:
    """Start Serve once for every load run (a proxy started per run can miss its readiness deadline on a loaded
    machine); returns the HTTP port."""
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": CALL_TIMEOUT_S})
    return port


def caption_load(config: ServeAppConfig, port: int, body: dict, requests: int, kill_at: int | None) -> dict:
    """Deploy, warm up, run `requests` caption calls at CONCURRENCY; optionally kill a captioner replica. The app
    is deleted afterwards (Serve keeps running)."""
    import ray
    from ray import serve

    from mengzi_ray.serving.app import compose_app

    try:
        serve.run(compose_app(config), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/caption"
        LoadRun(url, body, total=CONCURRENCY, concurrency=CONCURRENCY, timeout_s=CALL_TIMEOUT_S).start().wait()  # warm-up
        warm = {name: replica_batches(name) for name in ("Captioner", "Detector")}
        run = LoadRun(url, body, total=requests, concurrency=CONCURRENCY, timeout_s=CALL_TIMEOUT_S).start()
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
        calls = {}
        if killed is None:  # one replica each: its histogram minus the warm-up's is this run's
            for name, before in warm.items():
                after = replica_batches(name)
                calls[name] = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        return {**report.summary(), "response_batch_sizes": {str(k): v for k, v in sorted(report.batch_sizes.items())},
                "model_call_batch_sizes": calls, "killed_replica": killed, "replaced": replaced}
    finally:
        serve.delete("bench")


def retrieval_bench(retrieval_dir: str, features: str, texts: str, queries: int, candidate_counts: list[int]) -> list[dict]:
    gallery = load_gallery(GallerySection(features=features, texts=texts))
    encoder = MatchScorer.from_model_dir(retrieval_dir, "cpu", batch_size=512)
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


def stage_costs(caption_dir: str, image_path: Path, detector: dict, batch_sizes: tuple[int, ...] = (1, 4, 8)) -> dict:
    """In-process cost of the upload path's two model stages at each batch size (1 torch thread, as a replica of
    0.5 CPU gets): detector ms per image and captioner (beam 3) ms per request. The slower stage per request
    bounds the path's throughput whatever Serve's batching does."""
    from PIL import Image

    from mengzi_ray.features.card import DetectorSection
    from mengzi_ray.features.detectors.base import build_detector, detections_to_row
    from mengzi_ray.inference import Captioner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        detector = build_detector(DetectorSection.model_validate(detector))
        image = np.asarray(Image.open(image_path).convert("RGB"))
        row = detections_to_row(detector.detect([image], [None])[0], image_id="x", source="x", width=image.shape[1],
                                height=image.shape[0], detector=detector.name)
        regions = np.asarray(row["features"], dtype=np.float32)
        captioner = Captioner.from_model_dir(caption_dir, "cpu")
        tags = " ".join(row["tags"]) if isinstance(row["tags"], list) else row["tags"]

        def per_item_ms(call, n: int) -> float:
            call(n)  # warm-up at this batch size
            start = time.perf_counter()
            call(n)
            return (time.perf_counter() - start) * 1000 / n

        return {
            "detector_ms_per_image": {n: per_item_ms(lambda k: detector.detect([image] * k, [None] * k), n) for n in batch_sizes},
            "captioner_ms_per_request": {n: per_item_ms(lambda k: captioner.caption([regions] * k, [tags] * k, num_beams=3), n)
                                         for n in batch_sizes},
        }
    finally:
        torch.set_num_threads(threads)


def batching_runs(configs: dict[str, ServeAppConfig], port: int, body: dict, requests: int, title: str) -> dict:
    """Load each config in turn with the same body; print the table, the ratios and the histograms."""
    runs = {name: caption_load(config, port, body, requests, None) for name, config in configs.items()}
    print(f"\n{title}: {requests} requests, concurrency {CONCURRENCY}, beams 3")
    print_table(
        ["setting", "req/s", "p50 ms", "p99 ms", "mean batch", "errors", "captioner calls by batch size"],
        [[name, f"{r['req_per_s']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['mean_batch_size'] or 0:.2f}",
          sum(r["errors"].values()), r["model_call_batch_sizes"].get("Captioner")] for name, r in runs.items()],
    )
    base, batched = runs["batch size 1 (baseline)"], runs["batched"]
    ratios = {"throughput": batched["req_per_s"] / base["req_per_s"], "p99": batched["p99_ms"] / base["p99_ms"]}
    print(f"batched / baseline: throughput {ratios['throughput']:.2f}x, p99 {ratios['p99']:.2f}x; "
          f"detector calls by batch size (batched): {batched['model_call_batch_sizes'].get('Detector')}")
    return {"runs": runs, "ratios": ratios}


def caption_part(caption_dir: str, retrieval_dir: str, small, requests: int, parts: list[str], max_batch_size: int,
                 batch_wait_s: float) -> dict:
    """Figures 1-3 on a local Ray: precomputed regions ("batching") and image uploads ("upload"), batched vs batch
    size 1; two replicas with one killed mid-run ("kill")."""
    import ray

    features = str(small.features_path)
    row = pq.read_table(small.features_path).slice(0, 1).to_pylist()[0]
    from ray import serve

    init_local_ray(num_cpus=4)
    results: dict = {}
    try:
        port = start_serve()

        def configs(detector: dict | None) -> dict[str, ServeAppConfig]:
            return {
                "batch size 1 (baseline)": app_config(caption_dir, retrieval_dir, features, 1, 1, batch_wait_s=0.0, detector=detector),
                "batched": app_config(caption_dir, retrieval_dir, features, max_batch_size, 1, batch_wait_s=batch_wait_s, detector=detector),
            }

        if "batching" in parts:
            results["regions"] = batching_runs(configs(None), port, regions_body(row), requests,
                                               f"caption over HTTP, precomputed regions (base64), model {caption_dir}")
        if "upload" in parts:
            image = small.root / "images" / f"{row['image_id']}.png"
            results["upload"] = batching_runs(configs(local_detector()), port, upload_body(image), requests,
                                              f"caption over HTTP, image upload ({image.name}) via the tiny C4 detector")
            costs = stage_costs(caption_dir, image, local_detector())
            results["upload"]["stage_costs"] = costs
            print("in-process stage costs (1 thread), ms per item by batch size: "
                  + "; ".join(f"{k} {', '.join(f'{n}: {v:.0f}' for n, v in c.items())}" for k, c in costs.items()))
        if "kill" in parts:
            killed = caption_load(app_config(caption_dir, retrieval_dir, features, max_batch_size, 2, batch_wait_s=batch_wait_s),
                                  port, regions_body(row), requests, requests // 3)
            print(f"\nkilled replica {killed['killed_replica']} replaced: {killed['replaced']}; errors during the kill "
                  f"run: {sum(killed['errors'].values())} of {requests}")
            results["replica_killed"] = killed
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


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
    parser.add_argument("--requests", type=int, default=200, help="requests per load run (after 16 warm-up)")
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--caption-model", help="trained captioner dir (default: tiny random init)")
    parser.add_argument("--caption-shape", choices=["tiny", "base"], default="tiny",
                        help="random-init captioner shape when no --caption-model: tiny (64 wide) or base (768, 12 layers)")
    parser.add_argument("--retrieval-model", help="trained retrieval dir (default: tiny random init)")
    parser.add_argument("--work", help="scratch dir (default: a temp dir)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--max-batch-size", type=int, default=8, help="batched runs' max_batch_size")
    parser.add_argument("--batch-wait-s", type=float, default=0.05, help="batched runs' batch_wait_timeout_s")
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

    results: dict = {}
    if {"batching", "upload", "kill"} & set(args.parts):
        results["caption"] = caption_part(caption_dir, retrieval_dir, small, args.requests, args.parts,
                                          args.max_batch_size, args.batch_wait_s)
    if "retrieval" in args.parts:
        results["retrieval"] = retrieval_part(work, retrieval_dir, args.gallery, args.queries, args.candidates)
    settings = {
        "requests": args.requests, "concurrency": CONCURRENCY, "num_beams": 3, "gallery": args.gallery,
        "queries": args.queries, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
        "regions_form": "base64 float32", "caption_model": args.caption_model or f"{args.caption_shape}-shaped random init",
        "retrieval_model": args.retrieval_model or "tiny random init", "parts": args.parts,
    }
    name = "bench_serve" if set(args.parts) == set(PARTS) else "bench_serve_" + "_".join(args.parts)
    if base_shaped:
        name += "_base"
    print(f"\nwrote {write_results(name, torch.device('cpu'), commit, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
