"""Retrieval at gallery scale (issue 17): brute-force cross-encoder vs TF-IDF two-stage vs dual-encoder two-stage.

On the synthetic query set (`write_synthetic_dataset(unique=True)`: every caption describes exactly one image, so a
caption query has one right answer), in one process:

1. trains tiny retrieval models from the same init and seed: without the `retrieval.dual_encoder` section ("plain"),
   with it on the cross-encoder's trunk ("shared" tower), with a trunk of its own ("separate" tower), and with a
   trunk of its own plus the cross-encoder trained on the dual encoder's hard negatives ("ranked":
   `retrieval.dual_encoder.cross_rank_weight=1`)
   (in-process loop over the retrieval task's own batches and loss; no Ray), and reports the cross-encoder's own
   cross-image R@K of each on a held-out gallery (the dual section must not cost the cross-encoder ranking
   quality), plus the dual encoder's own R@K and the training time;
2. on a `--gallery`-image gallery (default 10,000), Serve's `RetrievalEngine` per method: ms per caption query,
   top-10 overlap with brute force, R@1/5/10 against the described image. Brute force scores every gallery image
   with the cross-encoder per query, so it runs on `--brute-queries` queries only; the cheap methods also run on
   `--queries` queries for steadier R@K.

    .venv/bin/python bench/bench_retrieval_stages.py [--gallery 10000] [--brute-queries 20] [--queries 100]
        [--candidates 100 200] [--steps 3000] [--variants plain shared] [--stage-model shared]
        [--set KEY=VALUE ...]
        [--model DIR]  (--model: a trained dir with a dual encoder; skips part 1)

The defaults are the committed run (about 20 minutes on 2 cores): the shared tower with 7 hard negatives from a
1,024-row bank and `cross_rank_weight` 2, trained 3,000 steps. Agreement with brute force follows the
cross-encoder's own quality: the same recipe at 1,500 steps ranked near-duplicate scenes less consistently and
shared about 0.6 of brute force's top 10 at either shortlist size.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, print_table, write_results  # noqa: E402

from mengzi_ray.config import load_card  # noqa: E402
from mengzi_ray.data.records import ImageRecord, load_image_records  # noqa: E402
from mengzi_ray.synthetic import write_synthetic_dataset  # noqa: E402
from mengzi_ray.serving.gallery import load_gallery  # noqa: E402
from mengzi_ray.inference import MatchScorer  # noqa: E402
from mengzi_ray.serving.retrieval import RetrievalEngine, SearchQuery  # noqa: E402
from mengzi_ray.serving.settings import GallerySection  # noqa: E402
from mengzi_ray.text import load_tokenizer  # noqa: E402
from mengzi_ray.training.card import RetrievalCard  # noqa: E402
from mengzi_ray.training.jobs import prepare_init  # noqa: E402
from mengzi_ray.training.optim import build_optimizer, warmup_linear  # noqa: E402
from mengzi_ray.training.tasks import NegativePool, task_for  # noqa: E402

CARD = Path(__file__).resolve().parents[1] / "jobs" / "retrieval_tiny.yaml"
log = logging.getLogger("bench_retrieval_stages")


VARIANTS = ("plain", "shared", "separate", "ranked")
RECIPE = ("retrieval.dual_encoder.hard_negatives=7", "retrieval.dual_encoder.cross_rank_weight=2",
          "retrieval.dual_encoder.negative_bank=1024")  # the committed run's dual-encoder settings
TOWER = {"shared": "shared", "separate": "separate", "ranked": "separate"}


def train(data: Path, work: Path, steps: int, variant: str, val_images: int, overrides: list[str]) -> tuple[str, dict[str, float]]:
    """Train the tiny card for `steps` steps in-process (batch 16, the card's lr and warmup, then `overrides`) as
    `variant` (one of VARIANTS); returns (model dir, validation metrics on the first `val_images` val images)."""
    dual = variant != "plain"
    card = load_card(RetrievalCard, CARD, [
        f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={work}",
        "retrieval.max_seq_length=40", f"retrieval.dual_encoder.enabled={str(dual).lower()}",
        *([f"retrieval.dual_encoder.tower={TOWER[variant]}"] if dual else []),
        *(["retrieval.dual_encoder.cross_rank_weight=1.0"] if variant == "ranked" else []),
        "retrieval.dual_encoder.dim=64", "scaling.num_workers=1", "batch.global_batch_size=16",
        "batch.per_worker_batch_size=16", f"schedule.max_steps={steps}", f"optim.warmup_steps={min(10, steps)}",
        *overrides,
    ])
    init_dir, _ = prepare_init(card, str(work / "init_run"))  # same vocab and init for both variants
    task = task_for(card, load_tokenizer(init_dir))
    model = task.model_class.from_pretrained(init_dir, **task.config_overrides())
    records = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "train")
    rows = [ImageRecord(r.image_id, r.features, r.od_labels, [t]) for r in records for t in r.texts]
    rng = np.random.default_rng(card.optim.seed)
    torch.manual_seed(card.optim.seed)
    pool = NegativePool(4096, rng)
    optimizer = build_optimizer(model, card.optim.learning_rate, card.optim.weight_decay, task.no_decay)
    scheduler = warmup_linear(optimizer, card.optim.warmup_steps, steps)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch_rows = [rows[i] for i in rng.choice(len(rows), size=16, replace=False)]
        pool.add(batch_rows)
        batch = {k: torch.as_tensor(v) for k, v in task.make_batch(batch_rows, rng, pool).items()}
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), card.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0:
            log.info("%s step %d/%d loss %.4f", variant, step + 1, steps, loss.item())
    seconds = time.perf_counter() - start
    val = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "val")[:val_images]
    metrics = task.validate(model, val)
    out = model.save_pretrained(work / variant)
    return str(out), {**metrics, "train_seconds": round(seconds, 1)}


def rank_of(truth: int, top: list[int]) -> int:
    return top.index(truth) if truth in top else len(top)


def compare_stages(model_dir: str, features: str, texts: str, brute_queries: int, queries: int,
                   candidates: list[int]) -> list[dict]:
    """Per method (two-stage ones at each shortlist size in `candidates`): ms/query, R@1/5/10 and top-10 overlap
    with brute force (Serve's engine, in-process)."""
    gallery = load_gallery(GallerySection(features=features, texts=texts))
    encoder = MatchScorer.from_model_dir(model_dir, batch_size=512)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(gallery.captions), size=max(queries, brute_queries), replace=False)
    wanted = [(gallery.captions[i], gallery.index_of[gallery.caption_image_ids[i]]) for i in picks]
    start = time.perf_counter()
    brute = RetrievalEngine(encoder, gallery, None, "tfidf")
    tfidf = RetrievalEngine(encoder, gallery, candidates[0], "tfidf")
    dual = RetrievalEngine(encoder, gallery, candidates[0], "dual_encoder")
    load_seconds = time.perf_counter() - start

    def top10(engine: RetrievalEngine, size: int | None) -> Callable[[str], list[int]]:
        def run(text: str) -> list[int]:
            engine.candidates = size
            return [h.index for h in engine.search([SearchQuery(k=10, text=text)])[0]]
        return run

    methods = {
        "brute force (cross-encoder)": top10(brute, None),
        **{f"TF-IDF → cross-encoder, {c}": top10(tfidf, c) for c in candidates},
        **{f"dual → cross-encoder, {c}": top10(dual, c) for c in candidates},
        "dual encoder alone": lambda text: dual.dual.images_for([text], 10)[0].tolist(),
        "TF-IDF alone": lambda text: tfidf.image_index.query(text, 10).tolist(),
    }
    brute_top: list[list[int]] = []
    rows = []
    for name, run in methods.items():
        is_brute = name.startswith("brute")
        chosen = wanted[:brute_queries] if is_brute else wanted
        seconds, ranks, overlap = [], [], []
        for q, (text, truth) in enumerate(chosen):
            begin = time.perf_counter()
            top = run(text)
            seconds.append(time.perf_counter() - begin)
            ranks.append(rank_of(truth, top))
            if is_brute:
                brute_top.append(top)
            elif q < len(brute_top):
                overlap.append(len(set(top) & set(brute_top[q])) / 10)
        ranks_array = np.array(ranks)
        rows.append({
            "method": name, "queries": len(chosen), "ms_per_query": float(np.mean(seconds) * 1000),
            **{f"R@{k}": float(np.mean(ranks_array < k)) for k in (1, 5, 10)},
            f"R@10_first_{brute_queries}": float(np.mean(ranks_array[:brute_queries] < 10)),
            "top10_overlap_with_brute": float(np.mean(overlap)) if overlap else (1.0 if is_brute else None),
        })
    log.info("engines built in %.1fs (dual-encoder gallery embedding included)", load_seconds)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--brute-queries", type=int, default=20)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 200], help="shortlist sizes")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=100, help="held-out gallery of part 1")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["plain", "shared"], help="part 1's models")
    parser.add_argument("--stage-model", choices=VARIANTS[1:], default="shared",
                        help="which trained variant part 2 compares the stages with")
    parser.add_argument("--set", nargs="*", default=list(RECIPE), metavar="KEY=VALUE",
                        help=f"card overrides for every variant (default: {' '.join(RECIPE)}; giving --set replaces them)")
    parser.add_argument("--model", help="trained retrieval dir with a dual encoder (skips training)")
    parser.add_argument("--work", help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    commit = git_commit()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_stages_"))
    results: dict = {}
    model_dir = args.model
    if model_dir is None:
        data = write_synthetic_dataset(work / "train", num_train=args.train_images, num_val=args.val_images, seed=3, unique=True)
        trained = {v: train(data.root, work / v, args.steps, v, args.val_images, args.set) for v in args.variants}
        results["training"] = {v: metrics for v, (_, metrics) in trained.items()}
        print(f"\ncross-encoder cross-image R@K on {args.val_images} held-out images after {args.steps} steps")
        keys = [f"val_{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["val_rsum"]
        print_table(["model", *[k[4:] for k in keys], "train s"],
                    [[name, *[f"{m[k]:.3f}" for k in keys], m["train_seconds"]] for name, m in results["training"].items()])
        for name, m in results["training"].items():
            if name != "plain":
                print(f"dual encoder alone ({name} tower): " + ", ".join(f"{k[9:]} {m[k]:.3f}" for k in m if k.startswith("val_dual_")))
        if args.stage_model not in trained:
            raise SystemExit(f"--stage-model {args.stage_model} is not among --variants {args.variants}")
        model_dir = trained[args.stage_model][0]
    start = time.perf_counter()
    gallery = write_synthetic_dataset(work / "gallery", num_train=0, num_val=args.gallery, seed=11, unique=True)
    print(f"\n{args.gallery}-image unique gallery written in {time.perf_counter() - start:.0f}s")
    rows = compare_stages(model_dir, str(gallery.features_path), str(gallery.text_path), args.brute_queries,
                          args.queries, args.candidates)
    results["stages"] = rows
    brute = rows[0]["ms_per_query"]
    print(f"\n{args.gallery}-image gallery, caption → image, top 10 (brute force on {args.brute_queries} queries)")
    print_table(["method", "queries", "ms/query", "speed-up vs brute", "R@1", "R@5", "R@10",
                 f"R@10 (first {args.brute_queries})", "top-10 overlap with brute"],
                [[r["method"], r["queries"], f"{r['ms_per_query']:.1f}", f"{brute / r['ms_per_query']:.0f}x",
                  f"{r['R@1']:.2f}", f"{r['R@5']:.2f}", f"{r['R@10']:.2f}", f"{r[f'R@10_first_{args.brute_queries}']:.2f}",
                  "-" if r["top10_overlap_with_brute"] is None else f"{r['top10_overlap_with_brute']:.2f}"] for r in rows])
    settings = {k: getattr(args, k) for k in ("gallery", "brute_queries", "queries", "candidates", "steps",
                                               "train_images", "val_images", "set")}
    settings["model"] = args.model or f"tiny, trained in this run ({args.stage_model} tower for part 2)"
    print(f"\nwrote {write_results('bench_retrieval_stages', torch.device('cpu'), commit, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
