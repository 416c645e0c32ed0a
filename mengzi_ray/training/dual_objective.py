"""The dual-encoder part of the retrieval fine-tune (card section `retrieval.dual_encoder`), used by RetrievalTask.

Per micro-batch of B (caption, image) rows the batch carries, beside the cross-encoder's 2B examples, each row's
text side (`text_side.*`), image side (`image_side.*`) and `dual_image_key` (an int64 naming the image, so two
captions of one image are not each other's negatives). The loss is

    cross-encoder CE + contrastive_weight · InfoNCE(gathered) + distill_weight · KL(cross-encoder ‖ dual)
                     [+ cross_rank_weight · listwise CE of the cross-encoder over the same hard pairs]

The teacher (the cross-encoder's match log-odds of each caption with its own image and its `hard_negatives`
in-batch images the dual encoder currently ranks highest) runs on the unwrapped model without gradient before the
training forward, so that the step's one DDP forward (cross-encoder + both sides) covers every gradient-carrying
use of the trunk. With `cross_rank_weight` > 0 the hard pairs are part of that forward instead (the cross-encoder
learns from them), and the teacher is their log-odds from it, detached (train mode: dropout included).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from mengzi_ray.data.dual_encoder import IMAGE_KEYS, TEXT_KEYS, DualEncoderTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.evaluation.retrieval_metrics import retrieval_recall
from mengzi_ray.inference.embedder import embed_sides
from mengzi_ray.modeling import OscarForRetrieval
from mengzi_ray.modeling.dual_encoder import contrastive_loss, distill_loss, hard_negatives, match_log_odds, rank_loss
from mengzi_ray.inference import collate
from mengzi_ray.training.card import DualEncoderSection

KEY = "dual_image_key"
TEXT_PREFIX, IMAGE_PREFIX = "text_side.", "image_side."


def image_key(image_id: str) -> int:
    """A stable signed 64-bit id of an image (the same on every worker and in every run)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class DualEncoderObjective:
    """Batch arrays, loss and validation of the dual encoder; `tz` shares the cross-encoder's layout."""

    def __init__(self, section: DualEncoderSection, tz: DualEncoderTensorizer, val_batch_size: int):
        self.section = section
        self.tz = tz
        self.val_batch_size = val_batch_size

    def batch_arrays(self, rows: Sequence[ImageRecord]) -> dict[str, np.ndarray]:
        """The B rows' text sides (their first text), image sides and image keys, stacked."""
        texts = [self.tz.text_side(r.texts[0]) for r in rows]
        images = [self.tz.image_side(r.od_labels, r.features) for r in rows]
        out = {TEXT_PREFIX + k: np.stack([t[k] for t in texts]) for k in TEXT_KEYS}
        out.update({IMAGE_PREFIX + k: np.stack([i[k] for i in images]) for k in IMAGE_KEYS})
        out[KEY] = np.array([image_key(r.image_id) for r in rows], dtype=np.int64)
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's loss; `model` is the (possibly DDP-wrapped) OscarForRetrieval with a dual encoder."""
        core: OscarForRetrieval = getattr(model, "module", model)
        text = {k: batch[TEXT_PREFIX + k] for k in TEXT_KEYS}
        image = {k: batch[IMAGE_PREFIX + k] for k in IMAGE_KEYS}
        keys = batch[KEY]
        cross = {k: v for k, v in batch.items() if not k.startswith((TEXT_PREFIX, IMAGE_PREFIX)) and k != KEY}
        s = self.section
        teacher = None
        if s.cross_rank_weight > 0:
            # The hard pairs join the training forward: the cross-encoder learns to rank them, and their log-odds
            # (detached) are the distillation teacher, so no separate teacher pass is needed.
            candidates, valid = self._candidates(core, text, image, keys)
            pairs = self._pairs(text, image, candidates, keys.device)
            size = cross["labels"].shape[0]
            labels = cross.pop("labels")
            out = model(**{k: torch.cat([v, pairs[k]]) for k, v in cross.items()}, text_side=text, image_side=image)
            odds = match_log_odds(out.logits[size:]).view(candidates.shape)
            loss = core.match_loss(out.logits[:size], labels) + s.cross_rank_weight * rank_loss(odds, valid)
            teacher = (candidates, valid, odds.detach())
        else:
            if s.distill_weight > 0:
                teacher = self._teacher(core, text, image, keys)
            out = model(**cross, text_side=text, image_side=image)
            loss = out.loss
        loss = loss + s.contrastive_weight * contrastive_loss(out.text_embeds, out.image_embeds, keys, s.temperature)
        if teacher is not None and s.distill_weight > 0:
            candidates, valid, logits = teacher
            loss = loss + s.distill_weight * distill_loss(
                out.text_embeds, out.image_embeds, candidates, valid, logits, s.temperature, s.distill_temperature)
        return loss

    @torch.no_grad()
    def _candidates(
        self, core: OscarForRetrieval, text: dict[str, torch.Tensor], image: dict[str, torch.Tensor], keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidates (B, 1+h): each caption's own image then the in-batch images the dual encoder (eval mode)
        ranks highest for it, valid (B, 1+h) bool)."""
        was_training = core.training
        core.eval()
        try:
            negatives, valid = hard_negatives(core.embed_texts(**text), core.embed_images(**image), keys, self.section.hard_negatives)
        finally:
            core.train(was_training)
        candidates = torch.cat([torch.arange(keys.shape[0], device=keys.device)[:, None], negatives], dim=1)
        return candidates, torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)

    def _pairs(
        self, text: dict[str, torch.Tensor], image: dict[str, torch.Tensor], candidates: torch.Tensor, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The cross-encoder inputs of every (caption i, candidate image j), row-major over candidates (B·(1+h) rows)."""
        text_np = {k: v.cpu().numpy() for k, v in text.items()}
        image_np = {k: v.cpu().numpy() for k, v in image.items()}
        return collate([
            self.tz.cross_example({k: v[i] for k, v in text_np.items()}, {k: v[j] for k, v in image_np.items()})
            for i, row in enumerate(candidates.tolist()) for j in row
        ], device)

    @torch.no_grad()
    def _teacher(
        self, core: OscarForRetrieval, text: dict[str, torch.Tensor], image: dict[str, torch.Tensor], keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidates (B, 1+h), valid (B, 1+h), the cross-encoder's log-odds (B, 1+h) in eval mode)."""
        candidates, valid = self._candidates(core, text, image, keys)
        was_training = core.training
        core.eval()
        try:
            logits = core(**self._pairs(text, image, candidates, keys.device)).logits
        finally:
            core.train(was_training)
        return candidates, valid, match_log_odds(logits).view(candidates.shape)

    @torch.no_grad()
    def validate(self, core: OscarForRetrieval, val_rows: Sequence[ImageRecord], captions_per_image: int) -> dict[str, float]:
        """The dual encoder's own cross-image R@K on the val gallery (same texts as the cross-encoder's ranking)."""
        texts = [(i, t) for i, r in enumerate(val_rows) for t in r.texts[:captions_per_image]]
        text_vectors = embed_sides(core, [self.tz.text_side(t) for _, t in texts], "text", self.val_batch_size)
        image_vectors = embed_sides(core, [self.tz.image_side(r.od_labels, r.features) for r in val_rows], "image",
                                    self.val_batch_size)
        scores = image_vectors @ text_vectors.T
        recall = retrieval_recall(scores, np.array([i for i, _ in texts]))
        return {f"val_dual_{k}": v for k, v in recall.items()}
