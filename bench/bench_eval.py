"""Evaluation throughput: retrieval pairs scored per second with 1 vs 2 Ray actors, and caption inference images
per second (beam 5) on Ray Data actors vs the single-process decoder.

* Retrieval: the cross-image pair space of the synthetic val split (N images × N·3 captions), scored by
  `score_pairs`; baseline = 1 actor, measured in the same run. Times are end to end (actor start and model load
  included), i.e. what the evaluate job pays.
* Caption: `predict_captions` (Ray Data, 1 actor, beam 5) vs `Captioner.caption_records` in this process (no Ray), same model,
  same images.

Models are tiny and random-init (throughput does not depend on the weights' quality); Ray runs embedded with 4
logical CPUs. Ray gives each actor OMP_NUM_THREADS = its CPUs (1), while the in-process baseline uses all threads.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import ray
import torch
from common import git_commit, init_local_ray, pick_device, print_table, write_results
from mengzi_ray.data.records import load_image_records
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.evaluation.caption_inference import predict_captions
from mengzi_ray.evaluation.retrieval_eval import CrossPairs, build_gallery, score_pairs
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning, OscarForRetrieval
from mengzi_ray.text import build_vocab, write_vocab
from mengzi_ray.inference import Captioner

SCRIPT = "bench_eval"
NUM_VAL = 24
CAPTIONS = 3
BATCH = 64
CHUNK = 512
NUM_BEAMS = 5
MAX_GEN = 22


def _tiny_model(cls: type, vocab: Path, out: Path) -> Path:
    torch.manual_seed(0)
    config = OscarConfig(
        vocab_size=sum(1 for _ in vocab.open(encoding="utf-8")), hidden_size=128, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, max_position_embeddings=64, use_img_layernorm=True,
        max_seq_a_length=24, max_seq_length=30, max_img_seq_length=4,
    )
    return cls(config).save_pretrained(out, vocab_file=vocab)


def bench_retrieval(model_dir: Path, gallery) -> list[dict]:
    pairs = CrossPairs(gallery.num_images, gallery.num_texts)
    rows = []
    for actors in (1, 2):
        start = time.perf_counter()
        score_pairs(str(model_dir), gallery, pairs, num_actors=actors, chunk_size=CHUNK, batch_size=BATCH)
        seconds = time.perf_counter() - start
        rows.append({"actors": actors, "pairs": pairs.num_pairs, "seconds": seconds, "pairs_per_s": pairs.num_pairs / seconds})
    return rows


def bench_caption(model_dir: Path, features: Path, val) -> list[dict]:
    ids = [r.image_id for r in val]
    start = time.perf_counter()
    predict_captions(str(features), str(model_dir), ids, num_beams=NUM_BEAMS, max_gen_length=MAX_GEN, num_actors=1, batch_size=16)
    ray_seconds = time.perf_counter() - start
    captioner = Captioner.from_model_dir(str(model_dir), "cpu", max_gen_length=MAX_GEN, batch_size=16)
    start = time.perf_counter()
    captioner.caption_records(val, num_beams=NUM_BEAMS)
    local_seconds = time.perf_counter() - start
    return [
        {"path": "in-process Captioner (baseline)", "images": len(ids), "seconds": local_seconds, "images_per_s": len(ids) / local_seconds},
        {"path": "Ray Data, 1 actor", "images": len(ids), "seconds": ray_seconds, "images_per_s": len(ids) / ray_seconds},
    ]


def main() -> None:
    commit = git_commit()
    device = pick_device()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_synthetic_dataset(root / "data", num_train=0, num_val=NUM_VAL, seed=0)
        val = load_image_records(data.features_path, data.text_path, "val")
        write_vocab(build_vocab([t for r in val for t in r.texts] + [r.od_labels for r in val]), root / "vocab.txt")
        retriever = _tiny_model(OscarForRetrieval, root / "vocab.txt", root / "retriever")
        captioner = _tiny_model(OscarForCaptioning, root / "vocab.txt", root / "captioner")
        refs = {r.image_id: r.texts for r in val}
        regions = {r.image_id: (r.features, r.od_labels, "") for r in val}
        gallery = build_gallery(list(refs), refs, regions, CAPTIONS)
        init_local_ray(num_cpus=4)
        try:
            retrieval = bench_retrieval(retriever, gallery)
            caption = bench_caption(captioner, data.features_path, val)
        finally:
            ray.shutdown()
    base = retrieval[0]["pairs_per_s"]
    print_table(
        ["retrieval scoring", "pairs", "seconds", "pairs/s", "ratio vs 1 actor"],
        [[f"{r['actors']} actor(s)", r["pairs"], f"{r['seconds']:.1f}", f"{r['pairs_per_s']:.0f}", f"{r['pairs_per_s'] / base:.2f}"] for r in retrieval],
    )
    print()
    base = caption[0]["images_per_s"]
    print_table(
        [f"caption inference (beam {NUM_BEAMS})", "images", "seconds", "images/s", "ratio vs baseline"],
        [[r["path"], r["images"], f"{r['seconds']:.1f}", f"{r['images_per_s']:.2f}", f"{r['images_per_s'] / base:.2f}"] for r in caption],
    )
    settings = {"num_val": NUM_VAL, "captions_per_image": CAPTIONS, "batch": BATCH, "chunk": CHUNK, "num_beams": NUM_BEAMS,
                "max_gen_length": MAX_GEN, "model": "hidden 128, 2 layers, random init", "ray_num_cpus": 4}
    path = write_results(SCRIPT, device, commit, settings, {"retrieval": retrieval, "caption": caption})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
