"""Retrieval inputs (microsoft/Oscar `oscar/run_retrieval.py` `RetrievalDataset`,
`compute_ranks`): caption ‖ tags ‖ regions, a positive and a sampled negative.

Text: [CLS] caption [SEP] (segment 0) + tags [SEP] (segment 1), padded to L. Attention-mask types: `CLR` (1-D:
every real token and region attends everything real) or `CL` / `CR` / `LR` (2-D: full attention inside the
caption C, the tags L and the regions R, plus the named pair in both directions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.common import TokenIds, pad_regions
from mengzi_ray.text import caption_tokens

MaskType = Literal["CLR", "CL", "CR", "LR"]


@dataclass(frozen=True)
class RetrievalLayout:
    max_seq_length: int = 70
    max_img_seq_length: int = 50
    img_feature_dim: int = 2054
    truncate_regions: bool = True  # False: more than max_img_seq_length regions is an error
    add_od_labels: bool = True
    att_mask_type: MaskType = "CLR"


class RetrievalTensorizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, layout: RetrievalLayout):
        if layout.att_mask_type not in ("CLR", "CL", "CR", "LR"):
            raise ValueError(f"att_mask_type must be CLR, CL, CR or LR, got {layout.att_mask_type!r}")
        self.tokenizer = tokenizer
        self.layout = layout
        self.ids = TokenIds.of(tokenizer)

    def example(self, caption: str, od_labels: str | None, img_feats: np.ndarray, label: int | None = None) -> dict[str, np.ndarray]:
        words = caption_tokens(self.tokenizer, caption)
        if not words:
            raise ValueError(f"caption {caption!r} is empty after normalisation")
        tags = caption_tokens(self.tokenizer, od_labels or "") if self.layout.add_od_labels else []
        convert = self.tokenizer.convert_tokens_to_ids
        return self.example_from_ids(convert(words), convert(tags), img_feats, label)

    def example_from_ids(
        self, caption_ids: list[int], tag_ids: list[int], img_feats: np.ndarray, label: int | None = None
    ) -> dict[str, np.ndarray]:
        """`example` from token ids (no specials): the dual-encoder distillation composes the cross-encoder input
        of a (caption, image) pair from the two sides' ids (data/dual_encoder.py)."""
        lay = self.layout
        ids = [self.ids.cls, *caption_ids[: lay.max_seq_length - 2], self.ids.sep]
        caption_len = len(ids)
        segments = [0] * caption_len
        # The original's bound goes negative when the caption fills L (and overflows L); we then add no tags.
        room = lay.max_seq_length - caption_len - 1
        if lay.add_od_labels and room >= 0:
            tags = list(tag_ids[:room])
            ids += [*tags, self.ids.sep]
            segments += [1] * (len(tags) + 1)
        seq_len = len(ids)
        pad = lay.max_seq_length - seq_len
        feats, num_regions = pad_regions(img_feats, lay.max_img_seq_length, lay.img_feature_dim, lay.truncate_regions)
        out = {
            "input_ids": np.array(ids + [self.ids.pad] * pad, dtype=np.int64),
            "attention_mask": self._mask(caption_len, seq_len, num_regions),
            "token_type_ids": np.array(segments + [0] * pad, dtype=np.int64),
            "img_feats": feats,
        }
        if label is not None:
            out["labels"] = np.array(label, dtype=np.int64)
        return out

    def _mask(self, caption_len: int, seq_len: int, num_regions: int) -> np.ndarray:
        lay = self.layout
        L, R = lay.max_seq_length, lay.max_img_seq_length
        if lay.att_mask_type == "CLR":
            return np.array([1] * seq_len + [0] * (L - seq_len) + [1] * num_regions + [0] * (R - num_regions), dtype=np.int64)
        spans = {"C": (0, caption_len), "L": (caption_len, seq_len), "R": (L, L + num_regions)}
        mask = np.zeros((L + R, L + R), dtype=np.int64)
        for start, end in spans.values():
            mask[start:end, start:end] = 1
        (a0, a1), (b0, b1) = (spans[part] for part in lay.att_mask_type)
        mask[a0:a1, b0:b1] = 1
        mask[b0:b1, a0:a1] = 1
        return mask


def negative_pair(
    image_index: int,
    num_images: int,
    rng: np.random.Generator,
) -> tuple[Literal["caption", "image"], int]:
    """The original's negative for a positive (caption, image): with prob 0.5 a caption of a random *other* image
    (same image), else the same caption with a random other image. Returns (what to swap, the other image index)."""
    if num_images < 2:
        raise ValueError("retrieval negatives need at least 2 images")
    other = int(rng.integers(0, num_images - 1))
    other += other >= image_index
    return ("caption" if rng.random() < 0.5 else "image"), other
