"""Single-process captioning: a plain PyTorch train loop and batched caption inference.

Used by the demo, the learning test, the benchmarks (as the no-Ray baseline) and single-process evaluation. The
Ray Train loop runs the same `caption_step` per worker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.captioning import CaptionTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.modeling import OscarForCaptioning
from mengzi_ray.text import decode_caption
from mengzi_ray.training.optim import build_optimizer, warmup_linear

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "img_feats", "masked_pos", "masked_ids")


def collate(examples: Sequence[dict[str, np.ndarray]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Stack per-example numpy arrays into batch tensors on `device`."""
    return {k: torch.as_tensor(np.stack([e[k] for e in examples])).to(device) for k in examples[0]}


def caption_step(model: OscarForCaptioning, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward one training batch; returns the loss (autocast is the caller's choice)."""
    return model(**{k: batch[k] for k in MODEL_INPUTS}).loss


def train_captioner(
    model: OscarForCaptioning,
    tensorizer: CaptionTensorizer,
    records: Sequence[ImageRecord],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    seed: int = 88,
    log_every: int = 50,
) -> list[float]:
    """Train for `steps` optimiser steps on (image, caption) pairs sampled uniformly; returns the loss per step."""
    pairs = [(r, caption) for r in records for caption in r.texts]
    rng = np.random.default_rng(seed)
    optimizer = build_optimizer(model, lr, weight_decay)
    scheduler = warmup_linear(optimizer, warmup_steps, steps)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in range(steps):
        chosen = rng.choice(len(pairs), size=batch_size, replace=len(pairs) < batch_size)
        batch = collate(
            [tensorizer.train_example(pairs[i][1], pairs[i][0].od_labels, pairs[i][0].features, rng) for i in chosen],
            device,
        )
        loss = caption_step(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-log_every:])))
    return losses


@torch.no_grad()
def caption_images(
    model: OscarForCaptioning,
    tokenizer: PreTrainedTokenizerBase,
    tensorizer: CaptionTensorizer,
    records: Sequence[ImageRecord],
    *,
    num_beams: int = 5,
    batch_size: int = 32,
) -> dict[str, tuple[str, float]]:
    """image_id → (caption, confidence = exp(score)). `tensorizer` must be in the test layout (for_generation)."""
    model.eval()
    device = next(model.parameters()).device
    max_length = tensorizer.layout.max_seq_a_length
    out: dict[str, tuple[str, float]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = collate([tensorizer.test_example(r.od_labels, r.features) for r in chunk], device)
        result = model.generate(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["img_feats"],
            num_beams=num_beams, max_length=max_length,
        )
        for record, ids, score in zip(chunk, result.sequences[:, 0], result.scores[:, 0]):
            out[record.image_id] = (decode_caption(tokenizer, ids.tolist()), float(score.exp()))
    return out
