"""Dual-encoder inputs (modeling/dual_encoder.py): each side of a retrieval pair on its own, in the retrieval
layout's budgets, so that an image embedded here and a caption embedded there meet the cross-encoder's input when
recombined (`cross_example`).

Text side: [CLS] caption [SEP], padded to L (max_seq_length), mask (L,), segment 0.
Image side: [CLS] tags [SEP] (tags segment 1, none when add_od_labels is off), padded to L, then the regions
padded to R (max_img_seq_length): mask (L + R,).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.common import pad_regions
from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer
from mengzi_ray.text import caption_tokens

TEXT_KEYS = ("input_ids", "attention_mask")
IMAGE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "img_feats")
TEXT_PREFIX, IMAGE_PREFIX = "text_side.", "image_side."
"""Column prefixes of the two sides in a batch of both (`sides_batch`)."""
SIDE_COLUMNS = tuple(TEXT_PREFIX + k for k in TEXT_KEYS) + tuple(IMAGE_PREFIX + k for k in IMAGE_KEYS)


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

    def sides_batch(
        self, captions: Sequence[str], od_labels: Sequence[str | None], img_feats: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """B (caption, image) rows → SIDE_COLUMNS stacked (B, ...): each caption's text side and each image's side
        (B may be 0). ValueError for a caption that is empty after normalisation or regions of the wrong shape."""
        if not captions:
            L, R, D = self.layout.max_seq_length, self.layout.max_img_seq_length, self.layout.img_feature_dim
            shapes = {"input_ids": (L,), "attention_mask": (L,)}
            out = {TEXT_PREFIX + k: np.zeros((0, *shapes[k]), np.int64) for k in TEXT_KEYS}
            shapes = {"input_ids": (L,), "attention_mask": (L + R,), "token_type_ids": (L,), "img_feats": (R, D)}
            out.update({IMAGE_PREFIX + k: np.zeros((0, *shapes[k]), np.float32 if k == "img_feats" else np.int64) for k in IMAGE_KEYS})
            return out
        texts = [self.text_side(c) for c in captions]
        images = [self.image_side(t, f) for t, f in zip(od_labels, img_feats)]
        out = {TEXT_PREFIX + k: np.stack([t[k] for t in texts]) for k in TEXT_KEYS}
        out.update({IMAGE_PREFIX + k: np.stack([i[k] for i in images]) for k in IMAGE_KEYS})
        return out

    def cross_example(self, text: dict[str, np.ndarray], image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cross-encoder input of (this text side's caption, this image side's image): the same arrays
        `RetrievalTensorizer.example(caption, tags, regions)` builds."""
        batch = self.cross_batch({k: v[None] for k, v in text.items()}, {k: np.asarray(v)[None] for k, v in image.items()})
        return {k: v[0] for k, v in batch.items()}

    def cross_batch(self, text: Mapping[str, np.ndarray], image: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`cross_example` of B pairs at once: text sides (B, L) and image sides (B, ...) → input_ids,
        token_type_ids (B, L), attention_mask (B, L + R) or (B, L + R, L + R) for the 2-D mask types, img_feats
        (B, R, D). Vectorised: the training step composes its positives, negatives and hard pairs with it."""
        lay, special = self.layout, self.cross.ids
        L, R = lay.max_seq_length, lay.max_img_seq_length
        text_ids, image_ids = np.asarray(text["input_ids"]), np.asarray(image["input_ids"])
        image_mask = np.asarray(image["attention_mask"])
        caption_len = np.asarray(text["attention_mask"]).sum(1)[:, None]  # [CLS] caption [SEP]
        tag_len = image_mask[:, :L].sum(1)[:, None]  # [CLS] tags [SEP]
        num_regions = image_mask[:, L:].sum(1)[:, None]
        # as RetrievalTensorizer.example_from_ids: the tags that fit after the caption, then [SEP]; none when the
        # caption leaves no room (the original's negative bound)
        room = L - caption_len - 1
        has_tags = (room >= 0) if lay.add_od_labels else np.zeros_like(room, dtype=bool)
        tags_end = caption_len + np.where(has_tags, np.minimum(tag_len - 2, room), 0)
        seq_len = np.where(has_tags, tags_end + 1, caption_len)
        p = np.arange(L)[None, :]
        from_tags = np.take_along_axis(image_ids, np.clip(p - caption_len + 1, 0, L - 1), axis=1)
        input_ids = np.where(p < caption_len, text_ids,
                             np.where(p < tags_end, from_tags, np.where(p < seq_len, special.sep, special.pad)))
        token_type_ids = ((p >= caption_len) & (p < seq_len)).astype(np.int64)
        regions = np.arange(R)[None, :] < num_regions
        if lay.att_mask_type == "CLR":
            mask = np.concatenate([p < seq_len, regions], axis=1).astype(np.int64)
        else:  # span of each position: 0 caption, 1 tags, 2 regions, -1 padding
            span = np.concatenate([np.where(p < caption_len, 0, np.where(p < seq_len, 1, -1)), np.where(regions, 2, -1)], axis=1)
            a, b = ("CLR".index(part) for part in lay.att_mask_type)
            i, j = span[:, :, None], span[:, None, :]
            mask = (((i == j) & (i >= 0)) | ((i == a) & (j == b)) | ((i == b) & (j == a))).astype(np.int64)
        return {"input_ids": input_ids.astype(np.int64), "attention_mask": mask, "token_type_ids": token_type_ids,
                "img_feats": np.asarray(image["img_feats"], dtype=np.float32)}
