"""The first five minutes: synthetic data → tiny captioner → training → metrics → a caption, on this machine.

Every stage prints a banner; every output lands under `out_dir`. Runs in one process on CPU in about two
minutes; the same steps scale out through the Ray jobs (see README).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.records import load_image_records
from mengzi_ray.datasets import write_synthetic_dataset
from mengzi_ray.evaluation import CaptionScores, format_table, score_captions
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import build_vocab, load_tokenizer, write_vocab
from mengzi_ray.training.caption_local import caption_images, train_captioner

LAYOUT = CaptionLayout(max_seq_a_length=24, max_seq_length=30, max_img_seq_length=5)
MAX_GEN_LENGTH = 22  # synthetic captions are at most 20 characters, plus [CLS] and [SEP]


@dataclass
class DemoResult:
    untrained_cider: float
    scores: CaptionScores
    model_dir: Path
    predictions_path: Path
    sample: tuple[str, str, list[str]]  # image_id, generated caption, references


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)), flush=True)


def run_demo(out_dir: str | Path, *, steps: int = 1000, num_train: int = 200, num_val: int = 40, seed: int = 0) -> DemoResult:
    out = Path(out_dir)
    torch.manual_seed(seed)
    banner(f"1/5 synthetic Chinese image-caption set → {out / 'data'}")
    ds = write_synthetic_dataset(out / "data", num_train=num_train, num_val=num_val, seed=seed)
    train = load_image_records(ds.features_path, ds.text_path, "train")
    val = load_image_records(ds.features_path, ds.text_path, "val")
    print(f"{len(train)} train / {len(val)} val images, region features (N, 2054) in {ds.features_path}")

    banner("2/5 tiny Oscar captioner (random init, vocab built from the data)")
    init_dir = out / "model-init"
    write_vocab(build_vocab([t for r in train for t in r.texts] + [r.od_labels for r in train]), init_dir / "vocab.txt")
    tokenizer = load_tokenizer(init_dir)
    config = OscarConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, use_img_layernorm=True, max_seq_a_length=LAYOUT.max_seq_a_length,
        max_seq_length=LAYOUT.max_seq_length, max_img_seq_length=LAYOUT.max_img_seq_length,
    )
    OscarForCaptioning(config).save_pretrained(init_dir, vocab_file=init_dir / "vocab.txt")
    model = OscarForCaptioning.from_pretrained(init_dir)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    test_tz = CaptionTensorizer(tokenizer, LAYOUT.for_generation(MAX_GEN_LENGTH))
    refs = {r.image_id: r.texts for r in val}
    before = caption_images(model, tokenizer, test_tz, val, num_beams=5)
    untrained = score_captions({k: c for k, (c, _) in before.items()}, refs, metrics=("CIDEr",)).scores["CIDEr"]

    banner(f"3/5 fine-tune captioning: {steps} steps, batch 32, lr 5e-4")
    start = time.perf_counter()
    losses = train_captioner(model, CaptionTensorizer(tokenizer, LAYOUT), train, steps=steps, batch_size=32, lr=5e-4, warmup_steps=20, log_every=100)
    print(f"loss {losses[0]:.2f} → {sum(losses[-50:]) / min(50, len(losses)):.2f} in {time.perf_counter() - start:.0f}s")
    model_dir = model.save_pretrained(out / "model")

    banner("4/5 evaluate on val (beam 5, character-level metrics)")
    preds = caption_images(model, tokenizer, test_tz, val, num_beams=5)
    scores = score_captions({k: c for k, (c, _) in preds.items()}, refs)
    print(format_table(scores))
    print(f"CIDEr untrained {untrained:.3f} → trained {scores.scores['CIDEr']:.3f}")
    predictions_path = out / "predictions.jsonl"
    with predictions_path.open("w", encoding="utf-8") as f:
        for image_id, (caption, conf) in preds.items():
            f.write(json.dumps({"image_id": image_id, "caption": caption, "conf": conf}, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps({**scores.to_dict(), "untrained_CIDEr": untrained}, indent=2, ensure_ascii=False))

    banner("5/5 caption a sample image")
    sample_id = val[0].image_id
    print(f"image   {ds.images_dir / (sample_id + '.png')}")
    print(f"caption {preds[sample_id][0]}  (conf {preds[sample_id][1]:.2f})")
    print(f"refs    {' / '.join(refs[sample_id])}")
    return DemoResult(untrained, scores, model_dir, predictions_path, (sample_id, preds[sample_id][0], refs[sample_id]))


def main(out_dir: str, steps: int) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_demo(out_dir, steps=steps)
    banner("outputs")
    print(f"model dir     {result.model_dir}  (config.json + model.safetensors + vocab.txt)")
    print(f"predictions   {result.predictions_path}")
    print(f"metrics       {Path(out_dir) / 'metrics.json'}")
    print("next: load the model with OscarForCaptioning.from_pretrained(model dir); see README for the jobs")
    return 0
