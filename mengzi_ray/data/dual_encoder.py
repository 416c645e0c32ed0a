"""Dual-encoder inputs (modeling/dual_encoder.py): each side of a retrieval pair on its own, in the retrieval
layout's budgets, so that an image embedded here and a caption embedded there meet the cross-encoder's input when
recombined (`cross_example`).

Text side: [CLS] caption [SEP], padded to L (max_seq_length), mask (L,), segment 0.
Image side: [CLS] tags [SEP] (tags segment 1, none when add_od_labels is off), padded to L, then the regions
padded to R (max_img_seq_length): mask (L + R,).
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.common import pad_regions
from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer
from mengzi_ray.text import caption_tokens

TEXT_KEYS = ("input_ids", "attention_mask")
IMAGE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "img_feats")


class DualEncoderTensorizer:
    """Builds each side's arrays; shares the cross-encoder's tokenizer, layout and special ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, layout: RetrievalLayout):
        self.cross = RetrievalTensorizer(tokenizer, layout)
        self.tokenizer = tokenizer
        self.layout = layout

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(caption_tokens(self.tokenizer, text))

    def _framed(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """[CLS] ids[:L-2] [SEP] padded to L, and the unpadded length."""
        special = self.cross.ids
        length = self.layout.max_seq_length
        framed = [special.cls, *ids[: length - 2], special.sep]
        return np.array(framed + [special.pad] * (length - len(framed)), dtype=np.int64), len(framed)

    def text_side(self, caption: str) -> dict[str, np.ndarray]:
        """input_ids (L,), attention_mask (L,) of one caption. ValueError when it is empty after normalisation."""
        ids = self._ids(caption)
        if not ids:
            raise ValueError(f"caption {caption!r} is empty after normalisation")
        input_ids, used = self._framed(ids)
        return {"input_ids": input_ids, "attention_mask": (np.arange(len(input_ids)) < used).astype(np.int64)}

    def image_side(self, od_labels: str | None, img_feats: np.ndarray) -> dict[str, np.ndarray]:
        """input_ids (L,), token_type_ids (L,), img_feats (R, D), attention_mask (L + R,) of one image."""
        lay = self.layout
        input_ids, used = self._framed(self._ids(od_labels or "") if lay.add_od_labels else [])
        feats, num_regions = pad_regions(img_feats, lay.max_img_seq_length, lay.img_feature_dim, lay.truncate_regions)
        segments = np.zeros(lay.max_seq_length, dtype=np.int64)
        segments[1:used] = 1
        mask = np.concatenate([np.arange(lay.max_seq_length) < used, np.arange(lay.max_img_seq_length) < num_regions])
        return {"input_ids": input_ids, "attention_mask": mask.astype(np.int64), "token_type_ids": segments,
                "img_feats": feats}

    def cross_example(self, text: dict[str, np.ndarray], image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cross-encoder input of (this text side's caption, this image side's image): the same arrays
        `RetrievalTensorizer.example(caption, tags, regions)` builds."""
        lay = self.layout
        caption_len = int(text["attention_mask"].sum())
        tag_len = int(image["attention_mask"][: lay.max_seq_length].sum())
        num_regions = int(image["attention_mask"][lay.max_seq_length :].sum())
        caption_ids = [int(i) for i in text["input_ids"][1 : caption_len - 1]]
        tag_ids = [int(i) for i in image["input_ids"][1 : tag_len - 1]]
        return self.cross.example_from_ids(caption_ids, tag_ids, np.asarray(image["img_feats"])[:num_regions])
