"""Single-process caption training: a plain PyTorch loop, the no-Ray baseline of the training benchmarks
(bench_train_ray.py, bench_train_step.py). Each step computes the same loss as a Ray Train worker's
(`training.tasks.caption_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from mengzi_ray.data.captioning import CaptionTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.modeling import OscarForCaptioning
from mengzi_ray.inference import collate
from mengzi_ray.training.optim import build_optimizer, warmup_linear
from mengzi_ray.training.step import StepOptions, TrainStep
from mengzi_ray.training.tasks import caption_loss

log = logging.getLogger(__name__)


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
    seed: int = 88,
    log_every: int = 50,
    options: StepOptions = StepOptions(),
) -> list[float]:
    """Train for `steps` optimiser steps on (image, caption) pairs sampled uniformly; returns the loss per step.
    `options`: precision, fused AdamW, checkpointing, compile and clipping, as the Ray loop takes them from a card."""
    pairs = [(r, caption) for r in records for caption in r.texts]
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, lr, weight_decay, fused=options.fused)
    scheduler = warmup_linear(optimizer, warmup_steps, steps)
    step_fn = TrainStep(model, optimizer, options, device)
    forward = step_fn.forward_module(model)
    model.train()
    losses = []
    for step in range(steps):
        chosen = rng.choice(len(pairs), size=batch_size, replace=len(pairs) < batch_size)
        batch = collate(
            [tensorizer.train_example(pairs[i][1], pairs[i][0].od_labels, pairs[i][0].features, rng) for i in chosen],
            device,
        )
        optimizer.zero_grad(set_to_none=True)
        with step_fn.autocast():
            loss = caption_loss(forward, batch)
        step_fn.backward(loss)
        step_fn.update()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("step %d/%d loss %.4f", step + 1, steps, float(np.mean(losses[-log_every:])))
    return losses
