"""`MatchScorer`: a retrieval model dir → match probabilities of (text, od labels, regions) pairs.

Callers: the evaluate job's pair-scoring actors (`evaluation.retrieval_eval`), Serve's Retriever replicas
(`serving.retrieval`) and the benchmarks. The input layout (text length, regions, od labels, attention mask type
CLR/CL/CR/LR, casing) is the one the model was trained with, read from its config (microsoft/Oscar
`run_retrieval.py`, `RetrievalDataset.tensorize_example`).

Scores are computed in fixed slices of `batch_size` pairs from the start of the list, and every example is padded
to the full layout, so a pair's score depends only on its inputs and its slot in that slicing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer
from mengzi_ray.inference.batch import ModelDirRunner, collate, model_placement
from mengzi_ray.modeling import OscarConfig, OscarForRetrieval
from mengzi_ray.text import tag_string
from mengzi_ray.text.tags import region_tags


class Pair(NamedTuple):
    """One (caption, image) pair as the cross-encoder reads it."""

    text: str
    od_labels: str  # the image's tag string, the model's tag map applied (MatchScorer.od_labels)
    regions: np.ndarray  # (N, img_feature_dim) float32


def retrieval_layout(config: OscarConfig) -> RetrievalLayout:
    """The input layout a retrieval model was trained with (its config.json / training_args.bin)."""
    return RetrievalLayout(
        max_seq_length=config.max_seq_length,
        max_img_seq_length=config.max_img_seq_length,
        img_feature_dim=config.img_feature_dim,
        add_od_labels=config.add_od_labels,
        att_mask_type=config.att_mask_type,  # type: ignore[arg-type]  # OscarConfig validates the four values
    )


class MatchScorer(ModelDirRunner):
    """An `OscarForRetrieval` cross-encoder with its tokenizer and layout; `score` → P(match) in [0, 1].

    Args:
        model: the retrieval model; put in eval mode here.
        tokenizer: the model dir's tokenizer.
        batch_size: pairs per forward pass.
    """

    model_cls = OscarForRetrieval

    def __init__(self, model: OscarForRetrieval, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tensorizer = RetrievalTensorizer(tokenizer, retrieval_layout(model.config))
        self.batch_size = batch_size

    @property
    def feature_dim(self) -> int:
        return self.tensorizer.layout.img_feature_dim

    def od_labels(self, labels: Sequence[str] | None, tags: Sequence[str]) -> str:
        """The od-label string this model is fed for one image (see `Captioner.od_labels`)."""
        return tag_string(region_tags(labels, tags, self.config.tag_map))

    @torch.no_grad()
    def logits(self, pairs: Sequence[Pair | tuple[str, str, np.ndarray]]) -> torch.Tensor:
        """(len(pairs), 2) float32 match-classifier logits, in order, on the model's device (validation's loss)."""
        device, dtype = model_placement(self.model)
        parts = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            batch = collate([self.tensorizer.example(text, tags, regions) for text, tags, regions in chunk], device, dtype)
            parts.append(self.model(**batch).logits.float())
        return torch.cat(parts) if parts else torch.zeros((0, 2), device=device)

    def score(self, pairs: Sequence[Pair | tuple[str, str, np.ndarray]]) -> np.ndarray:
        """(len(pairs),) float32 match probabilities softmax(logits)[:, 1], in order."""
        return OscarForRetrieval.match_score(self.logits(pairs)).cpu().numpy().astype(np.float32)
