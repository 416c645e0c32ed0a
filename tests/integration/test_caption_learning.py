"""Learning is observable: a tiny captioner trained for about a CPU minute (1,000 steps) on the synthetic set lifts val CIDEr
from ≈0 (untrained) past 2.0.

Why 2.0: a captioner that ignores the image and emits the most likely caption scores about 1.1 CIDEr on this
set (measured: 1.13 after 300 steps, when every image got the same caption), so 2.0 can only be reached by
reading colours, shapes and positions from the regions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.records import load_image_records
from mengzi_ray.datasets import write_synthetic_dataset
from mengzi_ray.evaluation import score_captions
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import build_vocab, load_tokenizer, write_vocab
from mengzi_ray.training.caption_local import caption_images, train_captioner


def test_tiny_captioner_learns_to_read_regions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ds = write_synthetic_dataset(tmp_path / "syn", num_train=200, num_val=40)
    train = load_image_records(ds.features_path, ds.text_path, "train")
    val = load_image_records(ds.features_path, ds.text_path, "val")
    model_dir = tmp_path / "model"
    write_vocab(build_vocab([t for r in train for t in r.texts] + [r.od_labels for r in train]), model_dir / "vocab.txt")
    tokenizer = load_tokenizer(model_dir)
    config = OscarConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, use_img_layernorm=True, max_seq_a_length=24, max_seq_length=30, max_img_seq_length=5,
    )
    OscarForCaptioning(config).save_pretrained(model_dir, vocab_file=model_dir / "vocab.txt")
    model = OscarForCaptioning.from_pretrained(model_dir)
    layout = CaptionLayout(max_seq_a_length=24, max_seq_length=30, max_img_seq_length=5)
    test_tz = CaptionTensorizer(tokenizer, layout.for_generation(22))
    refs = {r.image_id: r.texts for r in val}

    def val_cider() -> tuple[float, dict[str, tuple[str, float]]]:
        preds = caption_images(model, tokenizer, test_tz, val, num_beams=5)
        return score_captions({k: c for k, (c, _) in preds.items()}, refs, metrics=("CIDEr",)).scores["CIDEr"], preds

    before, _ = val_cider()
    losses = train_captioner(model, CaptionTensorizer(tokenizer, layout), train, steps=1000, batch_size=32, lr=5e-4, warmup_steps=20)
    after, preds = val_cider()
    print(f"val CIDEr untrained {before:.3f} → trained {after:.3f}; loss {losses[0]:.2f} → {sum(losses[-50:]) / 50:.2f}")
    assert before < 0.1
    assert after > 2.0
    assert len({c for c, _ in preds.values()}) >= 10  # captions depend on the image, not one prior sentence
    # The exported dir reloads and captions identically.
    model.save_pretrained(tmp_path / "trained")
    reloaded = OscarForCaptioning.from_pretrained(tmp_path / "trained")
    again = caption_images(reloaded, tokenizer, test_tz, val[:8], num_beams=5)
    for image_id, (caption, confidence) in again.items():
        assert caption == preds[image_id][0]
        assert abs(confidence - preds[image_id][1]) < 1e-5  # batch composition differs: float rounding only
