"""The three training tasks as the per-worker loop sees them: which model, how joined rows become a batch, the
loss, and validation. One class per task; `task_for(card)` picks it. No Ray here, so tasks test without Ray.

Negatives (pretraining pollution, retrieval negatives) come from the worker's recent rows (training/negatives.py).

Captioning, retrieval and pretraining build their examples upstream of the trainer (`upstream`: a Ray Data map
stage that tokenises; captioning: tokens, segments, padded regions and lengths; retrieval: each row's text and
image sides; pretraining: each row's own text_a and text_b tokens and padded regions) and only do per step what
must be per step, vectorised (`step_batch`: captioning masks; retrieval draws negatives and composes the
cross-encoder's pairs from the sides; pretraining pollutes, lays out and masks its pairs); SCST tensorises joined
rows in the worker (`make_batch`). `make_batch` stays the per-row reference of the upstream tasks: the same rows,
pool and generator give the same examples either way (tests/unit). Pretraining's dice that decides *whether* to
pollute is the original's (`data.pretraining.pollution_plan`: u > 0.5 matched, u > texta_false_prob swap text_b,
else swap text_a), so the 0.5 / 0.25 / 0.25 split holds exactly; only the population negatives come from is the
recent part of the stream rather than the whole corpus.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.pretraining import PREPARED_KEYS, TEXT_COLUMNS, Pollution, PretrainLayout, PretrainTensorizer, pollution_plan
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.data.dual_encoder import IMAGE_KEYS, IMAGE_PREFIX, SIDE_COLUMNS, TEXT_KEYS, TEXT_PREFIX, DualEncoderTensorizer
from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer
from mengzi_ray.evaluation import score_captions
from mengzi_ray.evaluation.retrieval_metrics import retrieval_recall
from mengzi_ray.modeling.config import OscarConfig
from mengzi_ray.text import caption_tokens
from mengzi_ray.modeling import OscarForCaptioning, OscarForPretraining, OscarForRetrieval
from mengzi_ray.inference import Captioner, MatchScorer, collate
from mengzi_ray.training.card import CaptionCard, PretrainCard, RetrievalCard, TrainCard
from mengzi_ray.training.dual_objective import KEY, DualEncoderObjective
from mengzi_ray.training.examples import prepare_caption_batch, prepare_pretrain_batch, prepare_retrieval_batch
from mengzi_ray.training.negatives import NegativePool, PreparedPool
from mengzi_ray.training.optim import CAPTION_NO_DECAY, PRETRAIN_NO_DECAY

Batch = dict[str, np.ndarray]

POOL_ROWS = 4096
"""Recent rows a worker keeps for tasks whose card does not size the pool (pretraining and retrieval do)."""

CAPTION_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "img_feats", "masked_pos", "masked_ids")
"""The tensors of a captioning training batch that OscarForCaptioning.forward takes."""


def caption_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked-token loss of one captioning training batch (autocast is the caller's choice)."""
    return model(**{k: batch[k] for k in CAPTION_INPUTS}).loss


class Task(ABC):
    """Base: subclasses set the model class, no-decay names, config overrides and the batch/loss/validation."""

    model_class: type = OscarForCaptioning
    no_decay: tuple[str, ...] = CAPTION_NO_DECAY
    per_image_train = False  # True: train rows carry all texts of one image
    find_unused_parameters = False  # DDP: True where part of the trunk (e.g. the pooler) gets no gradient
    manual_grad_sync = False  # True: no DDP wrapper; the loop all-reduces gradients itself (SCST)

    def __init__(self, card: TrainCard, tokenizer: PreTrainedTokenizerBase):
        self.card = card
        self.tokenizer = tokenizer

    def config_overrides(self) -> dict[str, Any]:
        """OscarConfig fields the card sets for this task. Training feeds the dataset's stored tags (tag_map None)
        and the layout written to config.json is the card's (layout_source)."""
        return {"img_feature_dim": self.card.model.img_feature_dim, "use_img_layernorm": self.card.model.use_img_layernorm,
                "tag_map": None, "layout_source": "config.json (training card)"}

    @abstractmethod
    def make_batch(self, rows: Sequence[ImageRecord], rng: np.random.Generator, pool: NegativePool) -> Batch:
        """Tensorise joined rows (numpy arrays with a leading batch axis); `pool` already holds `rows`."""

    def upstream(self) -> tuple[Callable[..., Batch], dict[str, Any]] | None:
        """(function, fn_kwargs) of a Ray Data map stage that builds the deterministic part of the train examples
        from joined Arrow batches (jobs.build_trainer applies it), or None: the worker calls `make_batch` on
        joined rows. With a stage, the worker calls `step_batch` on its output instead."""
        return None

    def step_batch(self, prepared: Batch, rng: np.random.Generator, pool: Any) -> Batch:
        """The model's batch from one micro-batch of the `upstream` stage's columns (what must stay per step,
        e.g. random masking, vectorised over the batch); same examples as `make_batch` on the same rows, rng and
        pool rows. `pool` is this task's `negative_pool`; step_batch adds the micro-batch to it."""
        raise NotImplementedError(f"{type(self).__name__} has no upstream stage")

    def negative_pool(self, rng: np.random.Generator) -> NegativePool | PreparedPool:
        """The store of recent rows that the loop keeps for this task (training/negatives.py)."""
        return NegativePool(POOL_ROWS, rng)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @abstractmethod
    def validate(self, model: torch.nn.Module, val_rows: Sequence[ImageRecord]) -> dict[str, float]:
        """Validation metrics (keys prefixed val_) of the unwrapped model on the val rows (all texts per image)."""

    def state(self, model: torch.nn.Module) -> dict[str, int]:
        """Per-process training state outside the optimiser that a checkpoint must carry."""
        return {}

    def load_state(self, model: torch.nn.Module, state: dict[str, int]) -> None:
        """Inverse of `state`."""

    def _batches(self, examples: list[Batch], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        size = self.card.validation.batch_size
        for start in range(0, len(examples), size):
            yield collate(examples[start : start + size], device)


class CaptionTask(Task):
    model_class = OscarForCaptioning
    find_unused_parameters = True  # the pooler is not part of the captioning loss

    def __init__(self, card: CaptionCard, tokenizer: PreTrainedTokenizerBase):
        super().__init__(card, tokenizer)
        c = card.caption
        self.layout = CaptionLayout(
            max_seq_a_length=c.max_seq_a_length, max_seq_length=c.max_seq_length, max_img_seq_length=c.max_img_seq_length,
            img_feature_dim=card.model.img_feature_dim, mask_prob=c.mask_prob, max_masked_tokens=c.max_masked_tokens,
            add_od_labels=c.add_od_labels,
        )
        self.train_tz = CaptionTensorizer(tokenizer, self.layout)
        self.test_tz = CaptionTensorizer(tokenizer, self.layout.for_generation(c.max_gen_length))

    def config_overrides(self) -> dict[str, Any]:
        c = self.card.caption
        return {
            **super().config_overrides(),
            **{k: getattr(c, k) for k in ("max_seq_a_length", "max_seq_length", "max_img_seq_length", "add_od_labels")},
            **{k: getattr(c, k) for k in ("label_smoothing", "drop_worst_ratio", "drop_worst_after", "tie_weights", "freeze_embedding")},
        }

    def make_batch(self, rows: Sequence[ImageRecord], rng: np.random.Generator, pool: NegativePool) -> Batch:
        return _stack([self.train_tz.train_example(r.texts[0], r.od_labels, r.features, rng) for r in rows])

    def upstream(self) -> tuple[Callable[..., Batch], dict[str, Any]] | None:
        return prepare_caption_batch, {"tensorizer": self.train_tz}

    def step_batch(self, prepared: Batch, rng: np.random.Generator, pool: Any) -> Batch:
        return self.train_tz.mask_batch(prepared, rng)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return caption_loss(model, batch)

    @torch.no_grad()
    def validate(self, model: OscarForCaptioning, val_rows: Sequence[ImageRecord]) -> dict[str, float]:
        """val_loss: masked-token loss on every val caption (fixed masking seed, no drop-worst, counter untouched);
        val_cider: character-level CIDEr of beam-search captions against all references."""
        device = next(model.parameters()).device
        rng = np.random.default_rng(0)
        examples = [self.train_tz.train_example(t, r.od_labels, r.features, rng) for r in val_rows for t in r.texts]
        model.eval()
        with _no_drop_worst(model):
            losses = [(caption_loss(model, b).item(), b["input_ids"].shape[0]) for b in self._batches(examples, device)]
        c = self.card.caption
        captioner = Captioner(model, self.tokenizer, max_gen_length=c.max_gen_length, batch_size=self.card.validation.batch_size)
        preds = captioner.caption_records(val_rows, num_beams=c.num_beams)
        cider = score_captions({k: v for k, (v, _) in preds.items()}, {r.image_id: r.texts for r in val_rows}, metrics=("CIDEr",))
        return {"val_loss": _weighted_mean(losses), "val_cider": cider.scores["CIDEr"]}

    def state(self, model: OscarForCaptioning) -> dict[str, int]:
        return {"drop_worst_calls": model.loss.calls}

    def load_state(self, model: OscarForCaptioning, state: dict[str, int]) -> None:
        model.loss.calls = int(state.get("drop_worst_calls", 0))


class RetrievalTask(Task):
    model_class = OscarForRetrieval

    def __init__(self, card: RetrievalCard, tokenizer: PreTrainedTokenizerBase):
        super().__init__(card, tokenizer)
        r = card.retrieval
        layout = RetrievalLayout(
            max_seq_length=r.max_seq_length, max_img_seq_length=r.max_img_seq_length, img_feature_dim=card.model.img_feature_dim,
            add_od_labels=r.add_od_labels, att_mask_type=r.att_mask_type,
        )
        self.tz = RetrievalTensorizer(tokenizer, layout)
        self.sides = DualEncoderTensorizer(tokenizer, layout)  # the upstream stage's text and image sides
        self.dual = DualEncoderObjective(r.dual_encoder, self.sides, card.validation.batch_size) if r.dual_encoder.enabled else None

    def config_overrides(self) -> dict[str, Any]:
        r = self.card.retrieval
        return {**super().config_overrides(), "max_img_seq_length": r.max_img_seq_length, "add_od_labels": r.add_od_labels,
                "max_seq_length": r.max_seq_length, "att_mask_type": r.att_mask_type,
                # unused by retrieval; kept within max_seq_length so the config stays valid
                "max_seq_a_length": min(OscarConfig.max_seq_a_length, r.max_seq_length),
                "dual_encoder_dim": r.dual_encoder.dim if r.dual_encoder.enabled else 0,
                "dual_encoder_temperature": r.dual_encoder.temperature, "dual_encoder_tower": r.dual_encoder.tower}

    def make_batch(self, rows: Sequence[ImageRecord], rng: np.random.Generator, pool: NegativePool) -> Batch:
        """B rows → 2B examples: the positives, then one negative each: with p = 0.5 another image's caption with
        this image, else this caption with another image (the other row from `pool.others`)."""
        others = pool.others([r.image_id for r in rows])
        swap_caption = rng.random(len(rows)) < 0.5
        positives = [self.tz.example(r.texts[0], r.od_labels, r.features, 1) for r in rows]
        negatives = [self.tz.example(o.texts[0], r.od_labels, r.features, 0) if swap
                     else self.tz.example(r.texts[0], o.od_labels, o.features, 0)
                     for r, o, swap in zip(rows, others, swap_caption)]
        batch = _stack(positives + negatives)
        if self.dual is not None:  # the positives' two sides (dual_objective.py)
            batch.update(self.dual.batch_arrays(rows))
        return batch

    def upstream(self) -> tuple[Callable[..., Batch], dict[str, Any]] | None:
        return prepare_retrieval_batch, {"tensorizer": self.sides}

    def negative_pool(self, rng: np.random.Generator) -> PreparedPool:
        return PreparedPool(self.card.retrieval.negative_pool_size, rng, SIDE_COLUMNS)

    def step_batch(self, prepared: Batch, rng: np.random.Generator, pool: PreparedPool) -> Batch:
        """`make_batch` from the upstream sides: the negatives' sides are gathered from the pool and every pair is
        composed at once (`DualEncoderTensorizer.cross_batch`)."""
        pool.add(prepared)
        slots = pool.draw(prepared["image_id"])
        swap_caption = rng.random(len(slots)) < 0.5
        # positives, then negatives: another image's caption (swap_caption) or another image, from the pool
        text = {k: pool.with_negatives(prepared[TEXT_PREFIX + k], TEXT_PREFIX + k, slots, swap_caption) for k in TEXT_KEYS}
        image = {k: pool.with_negatives(prepared[IMAGE_PREFIX + k], IMAGE_PREFIX + k, slots, ~swap_caption) for k in IMAGE_KEYS}
        batch = self.sides.cross_batch(text, image)
        batch["labels"] = np.repeat(np.array([1, 0], dtype=np.int64), len(slots))
        if self.dual is not None:
            batch.update({k: np.asarray(prepared[k]) for k in (*SIDE_COLUMNS, KEY)})
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss if self.dual is None else self.dual.loss(model, batch)

    @torch.no_grad()
    def validate(self, model: OscarForRetrieval, val_rows: Sequence[ImageRecord]) -> dict[str, float]:
        """Cross-image ranking over the val gallery (every image × every text); val_loss = class-balanced CE."""
        k = self.card.retrieval.val_captions_per_image
        texts = [(i, t) for i, r in enumerate(val_rows) for t in r.texts[:k]]
        text_to_image = np.array([i for i, _ in texts])
        scorer = MatchScorer(model, self.tokenizer, batch_size=self.card.validation.batch_size)
        logits = scorer.logits([(t, r.od_labels, r.features) for r in val_rows for _, t in texts])
        scores = OscarForRetrieval.match_score(logits).view(len(val_rows), len(texts)).cpu().numpy()
        match = torch.as_tensor(np.arange(len(val_rows))[:, None] == text_to_image[None, :]).view(-1).to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits, match.long(), reduction="none")
        metrics = {f"val_{k}": v for k, v in retrieval_recall(scores, text_to_image).items()}
        if self.dual is not None:
            metrics.update(self.dual.validate(model, val_rows, k))
        return {"val_loss": float((ce[match].mean() + ce[~match].mean()) / 2), **metrics}


class PretrainTask(Task):
    model_class = OscarForPretraining
    no_decay = PRETRAIN_NO_DECAY

    def __init__(self, card: PretrainCard, tokenizer: PreTrainedTokenizerBase):
        super().__init__(card, tokenizer)
        p = card.pretrain
        self.layout = PretrainLayout(
            max_seq_length=p.max_seq_length, max_img_seq_length=p.max_img_seq_length, img_feature_dim=card.model.img_feature_dim,
            mlm_prob=p.mlm_prob, texta_false_prob=p.texta_false_prob,
        )
        self.tz = PretrainTensorizer(tokenizer, self.layout)

    def config_overrides(self) -> dict[str, Any]:
        return {**super().config_overrides(), "num_contrast_classes": self.layout.num_contrast_classes}

    def _pollution(self, has_text_b: np.ndarray, rng: np.random.Generator) -> Pollution:
        return pollution_plan(has_text_b, rng, self.layout.texta_false_prob, self.layout.num_contrast_classes,
                              self.card.pretrain.textb_sample_mode)

    def make_batch(self, rows: Sequence[ImageRecord], rng: np.random.Generator, pool: NegativePool) -> Batch:
        """Per row: the pollution dice for the batch (`pollution_plan`), one other document per polluted row
        (`pool.others`), then each pair's strings tensorised on its own (`PretrainTensorizer.example`)."""
        has_b = np.array([bool(caption_tokens(self.tokenizer, r.text_b(0))) for r in rows], dtype=bool)
        plan = self._pollution(has_b, rng)
        polluted = np.flatnonzero(plan.polluted)
        others = dict(zip(polluted.tolist(), pool.others([rows[i].image_id for i in polluted])))
        examples = []
        for i, r in enumerate(rows):
            text_a, text_b = r.texts[0], r.text_b(0)
            if plan.swap_a[i]:
                text_a = others[i].texts[0]
            elif plan.swap_b[i]:
                text_b = others[i].texts[0] if plan.b_is_other_a[i] else others[i].text_b(0)
            examples.append(self.tz.example(text_a, text_b, int(plan.labels[i]), r.features, rng))
        return _stack(examples)

    def upstream(self) -> tuple[Callable[..., Batch], dict[str, Any]] | None:
        return prepare_pretrain_batch, {"tensorizer": self.tz}

    def negative_pool(self, rng: np.random.Generator) -> PreparedPool:
        return PreparedPool(self.card.pretrain.negative_pool_size, rng, TEXT_COLUMNS)

    def step_batch(self, prepared: Batch, rng: np.random.Generator, pool: PreparedPool) -> Batch:
        """`make_batch` from the upstream columns: adds them to the pool, then `_polluted_batch`."""
        pool.add(prepared)
        return self._polluted_batch(prepared, rng, pool)

    def _polluted_batch(self, prepared: Batch, rng: np.random.Generator, pool: PreparedPool) -> Batch:
        """The pollution dice, the polluted sides gathered from the pool's token arrays, then every pair laid out
        and masked at once (`PretrainTensorizer.compose_batch`)."""
        plan = self._pollution(np.asarray(prepared["text_b_len"]) > 0, rng)
        slots = np.zeros(len(plan.labels), dtype=np.int64)
        slots[plan.polluted] = pool.draw(np.asarray(prepared["image_id"])[plan.polluted])
        columns = {k: np.asarray(prepared[k]) for k in PREPARED_KEYS}
        for part in ("_ids", "_len"):
            other_a, other_b = (pool.ring.columns[side + part][slots] for side in ("text_a", "text_b"))
            other_b = np.where(_per_row(plan.b_is_other_a, other_a), other_a, other_b)
            for side, swap, other in (("text_a", plan.swap_a, other_a), ("text_b", plan.swap_b, other_b)):
                columns[side + part] = np.where(_per_row(swap, other), other, columns[side + part])
        return self.tz.compose_batch(columns, plan.labels, rng)

    @torch.no_grad()
    def validate(self, model: OscarForPretraining, val_rows: Sequence[ImageRecord]) -> dict[str, float]:
        """Fixed-seed pollution and masking of every val text (negatives from the other val texts' sides):
        val_loss (MLM + contrastive), val_mlm_acc."""
        device = next(model.parameters()).device
        rng = np.random.default_rng(0)
        texts = [(r, t, r.text_b(i)) for r in val_rows for i, t in enumerate(r.texts)]
        image_ids = np.array([r.image_id for r, _, _ in texts], dtype=object)
        sides = self.tz.text_sides([t for _, t, _ in texts], [b for _, _, b in texts])
        pool = PreparedPool(max(1, len(texts)), rng, TEXT_COLUMNS)
        pool.add({**sides, "image_id": image_ids})
        model.eval()
        losses, hits, targets = [], 0, 0
        size = self.card.validation.batch_size
        for start in range(0, len(texts), size):
            rows = slice(start, start + size)
            prepared = {**{k: v[rows] for k, v in sides.items()}, **self.tz.regions([r.features for r, _, _ in texts[rows]]),
                        "image_id": image_ids[rows]}
            b = {k: torch.as_tensor(v).to(device) for k, v in self._polluted_batch(prepared, rng, pool).items()}
            out = model(**b)
            hits += int(out.num_correct)
            targets += len(out.logits)  # with labels, one row of logits per target
            losses.append((out.loss.item(), len(b["masked_lm_labels"])))
        return {"val_loss": _weighted_mean(losses), "val_mlm_acc": hits / max(1, targets)}


def task_for(card: TrainCard, tokenizer: PreTrainedTokenizerBase) -> Task:
    """The task a card trains (SCST cards get the SCST task)."""
    if isinstance(card, CaptionCard):
        if card.scst is not None:
            from mengzi_ray.training.scst import ScstTask

            return ScstTask(card, tokenizer)
        return CaptionTask(card, tokenizer)
    if isinstance(card, RetrievalCard):
        return RetrievalTask(card, tokenizer)
    if isinstance(card, PretrainCard):
        return PretrainTask(card, tokenizer)
    raise TypeError(f"no training task for {type(card).__name__}")


def _per_row(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A (B,) row mask shaped to broadcast against `like` (B, ...)."""
    return mask.reshape(-1, *[1] * (like.ndim - 1))


def _stack(examples: list[Batch]) -> Batch:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _weighted_mean(pairs: list[tuple[float, int]]) -> float:
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


@contextlib.contextmanager
def _no_drop_worst(model: OscarForCaptioning) -> Iterator[None]:
    """Validation forward passes must neither drop tokens nor advance the per-process drop-worst counter."""
    calls, ratio = model.loss.calls, model.loss.drop_worst_ratio
    model.loss.drop_worst_ratio = 0.0
    try:
        yield
    finally:
        model.loss.calls, model.loss.drop_worst_ratio = calls, ratio
