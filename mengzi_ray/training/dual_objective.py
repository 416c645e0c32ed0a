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
from dataclasses import dataclass

import numpy as np
import torch

from mengzi_ray.data.dual_encoder import IMAGE_KEYS, IMAGE_PREFIX, TEXT_KEYS, TEXT_PREFIX, DualEncoderTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.evaluation.retrieval_metrics import retrieval_recall
from mengzi_ray.index.store import inner_products
from mengzi_ray.inference.embedder import embed_sides
from mengzi_ray.modeling import OscarForRetrieval
from mengzi_ray.modeling.dual_encoder import contrastive_loss, distill_loss, hard_negatives, match_log_odds, rank_loss
from mengzi_ray.training.card import DualEncoderSection
from mengzi_ray.training.negatives import ArrayRing

KEY = "dual_image_key"


def image_key(image_id: str) -> int:
    """A stable signed 64-bit id of an image (the same on every worker and in every run)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def image_keys(image_ids: Sequence[str]) -> np.ndarray:
    """`image_key` of each id, (n,) int64."""
    return np.array([image_key(i) for i in image_ids], dtype=np.int64)


@dataclass(frozen=True)
class Mined:
    """One step's hard-negative candidates. index (B, 1+h): per caption its own image (column 0) then the hard
    negatives, as rows of [the batch's B images, the bank's M images]; valid (B, 1+h) bool; batch_sides (B, ...) /
    bank_sides (M, ...): those images' sides (numpy; the bank's are views, valid until its next `add`);
    batch_vectors (B, dim) / bank_vectors (M, dim): their eval-mode embeddings."""

    index: torch.Tensor
    valid: torch.Tensor
    batch_sides: dict[str, np.ndarray]
    bank_sides: dict[str, np.ndarray]
    batch_vectors: torch.Tensor
    bank_vectors: torch.Tensor

    def side(self, j: int) -> dict[str, np.ndarray]:
        """The image side of candidate row j."""
        return {k: v[0] for k, v in self.sides(np.array([j])).items()}

    def sides(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The image sides of candidate rows (n,), stacked (n, ...): one gather from the batch and one from the bank."""
        size = len(self.batch_vectors)
        in_batch = rows < size
        out = {}
        for k, v in self.batch_sides.items():
            out[k] = np.empty((len(rows), *v.shape[1:]), dtype=v.dtype)
            out[k][in_batch] = v[rows[in_batch]]
            if not in_batch.all():
                out[k][~in_batch] = self.bank_sides[k][rows[~in_batch] - size]
        return out


class NegativeBank:
    """A ring buffer of the image sides (numpy) of the last `capacity` rows a worker trained on, with their
    eval-mode embeddings at the time (no gradient) and image keys: extra hard-negative candidates beside the batch
    (card `retrieval.dual_encoder.negative_bank`). Not checkpointed: after a restart it refills within
    capacity / B steps."""

    def __init__(self, capacity: int):
        self.ring = ArrayRing(capacity)  # the sides; vectors and keys are written to the same slots
        self.vectors = torch.empty(0)
        self.keys = torch.empty(0, dtype=torch.int64)

    @property
    def size(self) -> int:
        return self.ring.size

    @property
    def sides(self) -> dict[str, np.ndarray]:
        return self.ring.columns

    def add(self, sides: dict[str, np.ndarray], vectors: torch.Tensor, keys: torch.Tensor) -> None:
        """Store a batch (sides (B, ...), vectors (B, dim), keys (B,)), overwriting the oldest rows when full."""
        count = min(len(keys), self.ring.capacity)
        vectors, keys = vectors[-count:].detach().float(), keys[-count:]
        if not self.ring.columns:
            self.vectors = vectors.new_zeros((self.ring.capacity, vectors.shape[1]))
            self.keys = keys.new_zeros(self.ring.capacity)
        slots = self.ring.add(sides)
        self.vectors[torch.as_tensor(slots, device=vectors.device)] = vectors
        self.keys[torch.as_tensor(slots, device=keys.device)] = keys


class DualEncoderObjective:
    """Batch arrays, loss and validation of the dual encoder; `tz` shares the cross-encoder's layout."""

    def __init__(self, section: DualEncoderSection, tz: DualEncoderTensorizer, val_batch_size: int):
        self.section = section
        self.tz = tz
        self.val_batch_size = val_batch_size
        self.bank = NegativeBank(section.negative_bank) if section.negative_bank else None

    def batch_arrays(self, rows: Sequence[ImageRecord]) -> dict[str, np.ndarray]:
        """The B rows' text sides (their first text), image sides and image keys, stacked."""
        out = self.tz.sides_batch([r.texts[0] for r in rows], [r.od_labels for r in rows], [r.features for r in rows])
        out[KEY] = image_keys([r.image_id for r in rows])
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's loss; `model` is the (possibly DDP-wrapped) OscarForRetrieval with a dual encoder."""
        core: OscarForRetrieval = getattr(model, "module", model)
        text = {k: batch[TEXT_PREFIX + k] for k in TEXT_KEYS}
        image = {k: batch[IMAGE_PREFIX + k] for k in IMAGE_KEYS}
        keys = batch[KEY]
        cross = {k: v for k, v in batch.items() if not k.startswith((TEXT_PREFIX, IMAGE_PREFIX)) and k != KEY}
        s = self.section
        mined = self._candidates(core, text, image, keys) if s.cross_rank_weight > 0 or s.distill_weight > 0 else None
        teacher = None
        if mined is not None and s.cross_rank_weight > 0:
            # The hard pairs join the training forward: the cross-encoder learns to rank them, and their log-odds
            # (detached) are the distillation teacher, so no separate teacher pass is needed.
            pairs = self._pairs(text, mined)
            labels = cross.pop("labels")
            size = labels.shape[0]
            out = model(**{k: torch.cat([v, pairs[k]]) for k, v in cross.items()}, text_side=text, image_side=image)
            teacher = match_log_odds(out.logits[size:]).view(mined.index.shape)
            loss = core.match_loss(out.logits[:size], labels) + s.cross_rank_weight * rank_loss(teacher, mined.valid)
            teacher = teacher.detach()
        else:
            if mined is not None:
                teacher = self._teacher(core, text, mined)
            out = model(**cross, text_side=text, image_side=image)
            loss = out.loss
        loss = loss + s.contrastive_weight * contrastive_loss(out.text_embeds, out.image_embeds, keys, s.temperature)
        if mined is not None and s.distill_weight > 0:
            students = torch.cat([out.image_embeds, mined.bank_vectors.to(out.image_embeds.dtype)])
            loss = loss + s.distill_weight * distill_loss(
                out.text_embeds, students, mined.index, mined.valid, teacher, s.temperature, s.distill_temperature)
        if self.bank is not None and mined is not None:
            self.bank.add(mined.batch_sides, mined.batch_vectors, keys)
        return loss

    @torch.no_grad()
    def _candidates(
        self, core: OscarForRetrieval, text: dict[str, torch.Tensor], image: dict[str, torch.Tensor], keys: torch.Tensor
    ) -> Mined:
        """Each caption's own image, then the `hard_negatives` images the dual encoder (eval mode) ranks highest for
        it among the batch's images and the negative bank's."""
        was_training = core.training
        core.eval()
        try:
            text_vectors, image_vectors = core.embed_texts(**text), core.embed_images(**image)
        finally:
            core.train(was_training)
        bank = self.bank if self.bank is not None and self.bank.size else None
        used = bank.size if bank is not None else 0
        bank_vectors = bank.vectors[:used] if bank is not None else image_vectors.new_zeros((0, image_vectors.shape[1]))
        bank_keys = bank.keys[:used] if bank is not None else keys.new_zeros(0)
        negatives, valid = hard_negatives(text_vectors, torch.cat([image_vectors, bank_vectors]),
                                          torch.cat([keys, bank_keys]), self.section.hard_negatives, text_keys=keys)
        index = torch.cat([torch.arange(keys.shape[0], device=keys.device)[:, None], negatives], dim=1)
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        batch_sides = {k: v.cpu().numpy() for k, v in image.items()}
        bank_sides = {k: v[:used] for k, v in bank.sides.items()} if bank is not None else {}
        return Mined(index, valid, batch_sides, bank_sides, image_vectors, bank_vectors.clone())

    def _pairs(self, text: dict[str, torch.Tensor], mined: Mined) -> dict[str, torch.Tensor]:
        """The cross-encoder inputs of every (caption i, candidate image j), row-major over candidates (B·(1+h) rows)."""
        per_caption = mined.index.shape[1]
        text_np = {k: np.repeat(v.cpu().numpy(), per_caption, axis=0) for k, v in text.items()}
        pairs = self.tz.cross_batch(text_np, mined.sides(mined.index.reshape(-1).cpu().numpy()))
        return {k: torch.as_tensor(v).to(mined.index.device) for k, v in pairs.items()}

    @torch.no_grad()
    def _teacher(self, core: OscarForRetrieval, text: dict[str, torch.Tensor], mined: Mined) -> torch.Tensor:
        """The cross-encoder's match log-odds (B, 1+h) of the mined pairs, in eval mode."""
        was_training = core.training
        core.eval()
        try:
            logits = core(**self._pairs(text, mined)).logits
        finally:
            core.train(was_training)
        return match_log_odds(logits).view(mined.index.shape)

    @torch.no_grad()
    def validate(self, core: OscarForRetrieval, val_rows: Sequence[ImageRecord], captions_per_image: int) -> dict[str, float]:
        """The dual encoder's own cross-image R@K on the val gallery (same texts as the cross-encoder's ranking)."""
        texts = [(i, t) for i, r in enumerate(val_rows) for t in r.texts[:captions_per_image]]
        text_vectors = embed_sides(core, [self.tz.text_side(t) for _, t in texts], "text", self.val_batch_size)
        image_vectors = embed_sides(core, [self.tz.image_side(r.od_labels, r.features) for r in val_rows], "image",
                                    self.val_batch_size)
        scores = inner_products(image_vectors, text_vectors)
        recall = retrieval_recall(scores, np.array([i for i, _ in texts]))
        return {f"val_dual_{k}": v for k, v in recall.items()}
