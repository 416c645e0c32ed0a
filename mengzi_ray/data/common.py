"""Pieces every example builder shares: the special ids of a vocab and padding region features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase



@dataclass(frozen=True)
class TokenIds:
    """The special ids of a tokenizer's vocab, read once (never assumed: vocabs differ)."""

    cls: int
    sep: int
    pad: int
    mask: int
    unk: int
    vocab_size: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> "TokenIds":
        ids = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"])
        return cls(*ids, vocab_size=len(tokenizer))


def pad_regions(
    features: np.ndarray, max_regions: int, feature_dim: int, truncate: bool = True
) -> tuple[np.ndarray, int]:
    """First `max_regions` rows of (N, D) features, zero rows appended → ((max_regions, D) float32, kept count).

    Keeping the first rows is the original's rule (regions come in detector order); `truncate=False` makes more
    than `max_regions` rows an error instead, for callers that must not drop input silently (serving)."""
    feats = np.asarray(features, dtype=np.float32)
    if feats.size == 0:
        feats = feats.reshape(0, feature_dim)
    if feats.ndim != 2 or feats.shape[1] != feature_dim:
        raise ValueError(f"region features must be (N, {feature_dim}), got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("region features contain NaN or inf")
    if not truncate and feats.shape[0] > max_regions:
        raise ValueError(f"{feats.shape[0]} regions, more than max_img_seq_length {max_regions}")
    kept = min(feats.shape[0], max_regions)
    out = np.zeros((max_regions, feature_dim), dtype=np.float32)
    out[:kept] = feats[:kept]
    return out, kept
