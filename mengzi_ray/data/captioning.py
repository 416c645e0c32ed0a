"""Captioning inputs (microsoft/Oscar `oscar/run_captioning.py` `CaptionTensorizer`): "seq2seq by masking" train
layout and the [MASK]-prompt test layout.

Text layout, A = caption budget (max_seq_a_length), L = text length (max_seq_length), R = regions:
    [CLS] caption… [SEP] [PAD]… (up to A) │ tags… [SEP] (segment 1) │ [PAD]… (up to L) ‖ R region rows
Attention mask (L+R)×(L+R), 1 = row may attend column: the caption attends causally to itself and fully to
tags and regions; tags and regions attend to each other but never to the caption; padding rows/columns are 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.common import TokenIds, pad_regions
from mengzi_ray.text import caption_tokens


@dataclass(frozen=True)
class CaptionLayout:
    max_seq_a_length: int = 40  # A
    max_seq_length: int = 70  # L
    max_img_seq_length: int = 50  # R
    img_feature_dim: int = 2054
    truncate_regions: bool = True  # False: more than max_img_seq_length regions is an error
    mask_prob: float = 0.15
    max_masked_tokens: int = 3
    add_od_labels: bool = True

    def __post_init__(self) -> None:
        if not 3 <= self.max_seq_a_length <= self.max_seq_length:
            raise ValueError(f"need 3 <= max_seq_a_length ({self.max_seq_a_length}) <= max_seq_length ({self.max_seq_length})")
        if self.add_od_labels and self.max_seq_length - self.max_seq_a_length < 1:
            raise ValueError("od labels need max_seq_length > max_seq_a_length (room for at least the [SEP])")

    def for_generation(self, max_gen_length: int) -> "CaptionLayout":
        """The test layout keeps the tag budget of training: L_test = G + (L_train − A_train)."""
        return CaptionLayout(
            max_seq_a_length=max_gen_length,
            max_seq_length=max_gen_length + self.max_seq_length - self.max_seq_a_length,
            max_img_seq_length=self.max_img_seq_length,
            img_feature_dim=self.img_feature_dim,
            truncate_regions=self.truncate_regions,
            mask_prob=self.mask_prob,
            max_masked_tokens=self.max_masked_tokens,
            add_od_labels=self.add_od_labels,
        )


def seq2seq_attention_masks(
    seq_a_len: np.ndarray, a: int, seq_len: np.ndarray, num_text: int, num_regions: np.ndarray, max_regions: int
) -> np.ndarray:
    """(B, L+R, L+R) 0/1 masks of B examples, each from its (B,) lengths: caption C=[0,seq_a_len) causal,
    tags Lb=[a,seq_len), regions Rg=[L, L+num_regions). Built by broadcasting, no per-example Python."""
    n = num_text + max_regions
    idx = np.arange(n)
    rows, cols = idx[None, :, None], idx[None, None, :]

    def within(i: np.ndarray, start: np.ndarray | int, stop: np.ndarray) -> np.ndarray:
        return (i >= np.asarray(start).reshape(-1, 1, 1)) & (i < np.asarray(stop).reshape(-1, 1, 1))

    caption_row, caption_col = within(rows, 0, seq_a_len), within(cols, 0, seq_a_len)
    seen_row = within(rows, a, seq_len) | within(rows, num_text, num_text + num_regions)  # tags or regions
    seen_col = within(cols, a, seq_len) | within(cols, num_text, num_text + num_regions)
    mask = (caption_row & ((caption_col & (cols <= rows)) | seen_col)) | (seen_row & seen_col)
    return mask.astype(np.int64)


def seq2seq_attention_mask(seq_a_len: int, a: int, seq_len: int, num_text: int, num_regions: int, max_regions: int) -> np.ndarray:
    """The (L+R)×(L+R) mask of one example (see `seq2seq_attention_masks`)."""
    one = np.array([0])
    return seq2seq_attention_masks(one + seq_a_len, a, one + seq_len, num_text, one + num_regions, max_regions)[0]


PREPARED_KEYS = ("input_ids", "token_type_ids", "img_feats", "seq_a_len", "seq_len", "num_regions")
"""The deterministic part of a train example (`CaptionTensorizer.prepare_batch`); masking adds the rest."""


class CaptionTensorizer:
    """Turns (caption, od-label string, region features) into the original's captioning tensors (numpy).

    Training examples are built in two halves so the first can run upstream of the trainer (a Ray Data stage,
    training/examples.py): `prepare_batch` (tokens, segments, padded regions, lengths; deterministic) and
    `mask_batch` (the random caption masking and the attention masks, vectorised over the batch). `train_example`
    is the two halves on one row; the random draws are a fixed number of uniforms per row taken row-major from
    the generator, so masking B prepared rows at once equals B `train_example` calls with the same generator."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, layout: CaptionLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        self.ids = TokenIds.of(tokenizer)

    def _text(self, words: list[str], od_labels: str | None) -> tuple[list[str], list[int], int, int]:
        lay = self.layout
        tokens = ["[CLS]"] + words[: lay.max_seq_a_length - 2] + ["[SEP]"]
        seq_a_len = len(tokens)
        segments = [0] * seq_a_len
        if lay.add_od_labels:
            tokens += ["[PAD]"] * (lay.max_seq_a_length - seq_a_len)
            segments += [0] * (lay.max_seq_a_length - seq_a_len)
            label_tokens = caption_tokens(self.tokenizer, od_labels or "")[: lay.max_seq_length - lay.max_seq_a_length - 1]
            tokens += label_tokens + ["[SEP]"]
            segments += [1] * (len(label_tokens) + 1)
        return tokens, segments, seq_a_len, len(tokens)

    def _encode(self, words: list[str], od_labels: str | None, img_feats: np.ndarray) -> dict[str, np.ndarray]:
        """Unmasked ids (L,), segments (L,), regions (R, D) float32 and the three lengths (0-d int64)."""
        lay = self.layout
        tokens, segments, seq_a_len, seq_len = self._text(words, od_labels)
        pad = lay.max_seq_length - seq_len
        feats, num_regions = pad_regions(img_feats, lay.max_img_seq_length, lay.img_feature_dim, lay.truncate_regions)
        return {
            "input_ids": np.array(self.tokenizer.convert_tokens_to_ids(tokens) + [self.ids.pad] * pad, dtype=np.int64),
            "token_type_ids": np.array(segments + [0] * pad, dtype=np.int64),
            "img_feats": feats,
            "seq_a_len": np.int64(seq_a_len), "seq_len": np.int64(seq_len), "num_regions": np.int64(num_regions),
        }

    def prepare_batch(
        self, captions: Sequence[str], od_labels: Sequence[str | None], img_feats: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The deterministic half of B train examples: PREPARED_KEYS with a leading batch axis (B may be 0).
        ValueError for a caption that is empty after normalisation or regions of the wrong shape."""
        lay = self.layout
        examples = []
        for caption, labels, feats in zip(captions, od_labels, img_feats):
            words = caption_tokens(self.tokenizer, caption)
            if not words:
                raise ValueError(f"caption {caption!r} is empty after normalisation")
            examples.append(self._encode(words, labels, feats))
        if not examples:
            text, regions = (0, lay.max_seq_length), (0, lay.max_img_seq_length, lay.img_feature_dim)
            return {"input_ids": np.zeros(text, np.int64), "token_type_ids": np.zeros(text, np.int64),
                    "img_feats": np.zeros(regions, np.float32), **{k: np.zeros(0, np.int64) for k in PREPARED_KEYS[3:]}}
        return {k: np.stack([e[k] for e in examples]) for k in PREPARED_KEYS}

    def mask_batch(self, prepared: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Train batch from prepared rows: up to max_masked_tokens caption positions per row (never [CLS]; the
        closing [SEP] is a candidate, so the model learns to stop), each → [MASK] (80%), a uniform id of
        [0, vocab] where the id == vocab size becomes [UNK] (10%, the original's inclusive randint kept), or kept
        (10%); masked_ids are the originals in position order. Per row the generator gives A−1 + 3M uniforms:
        A−1 sort keys choosing the positions, then M each for [MASK], random-vs-keep and the random id."""
        lay = self.layout
        a, m = lay.max_seq_a_length, lay.max_masked_tokens
        input_ids = np.array(prepared["input_ids"], dtype=np.int64)  # a copy: masking writes into it
        seq_a_len = np.asarray(prepared["seq_a_len"], dtype=np.int64)
        batch = len(seq_a_len)
        draws = rng.random((batch, a - 1 + 3 * m))
        candidates = np.arange(1, a)
        keys = np.where(candidates[None, :] < seq_a_len[:, None], draws[:, : a - 1], np.inf)
        k = min(m, a - 1)
        count = np.minimum(np.minimum(np.maximum(np.round(lay.mask_prob * seq_a_len), 1), m), seq_a_len - 1)
        valid = np.arange(k)[None, :] < count[:, None]
        picked = np.where(valid, np.argsort(keys, axis=1, kind="stable")[:, :k] + 1, a)
        order = np.argsort(picked, axis=1, kind="stable")
        positions = np.take_along_axis(picked, order, axis=1)  # ascending: the chosen, then fillers (= a)
        at = np.minimum(positions, a - 1)
        originals = np.take_along_axis(input_ids, at, axis=1)
        use_mask, use_random, which = (draws[:, a - 1 + i * m : a - 1 + i * m + k] for i in range(3))
        drawn = np.floor(which * (self.ids.vocab_size + 1)).astype(np.int64)
        drawn = np.where(drawn < self.ids.vocab_size, drawn, self.ids.unk)
        replaced = np.where(use_mask <= 0.8, self.ids.mask, np.where(use_random <= 0.5, drawn, originals))
        rows = np.broadcast_to(np.arange(batch)[:, None], at.shape)
        input_ids[rows[valid], at[valid]] = replaced[valid]
        masked_pos = np.zeros((batch, lay.max_seq_length), dtype=np.int64)
        masked_pos[rows[valid], at[valid]] = 1
        masked_ids = np.zeros((batch, m), dtype=np.int64)
        masked_ids[:, :k] = np.where(valid, originals, 0)
        mask = seq2seq_attention_masks(
            seq_a_len, a, np.asarray(prepared["seq_len"]), lay.max_seq_length, np.asarray(prepared["num_regions"]),
            lay.max_img_seq_length,
        )
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.asarray(prepared["token_type_ids"]),
                "img_feats": np.asarray(prepared["img_feats"]), "masked_pos": masked_pos, "masked_ids": masked_ids}

    def train_example(
        self, caption: str, od_labels: str | None, img_feats: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Train layout of one row (`prepare_batch` and `mask_batch` on a batch of one)."""
        batch = self.mask_batch(self.prepare_batch([caption], [od_labels], [img_feats]), rng)
        return {k: v[0] for k, v in batch.items()}

    def test_example(self, od_labels: str | None, img_feats: np.ndarray) -> dict[str, np.ndarray]:
        """Test layout: the caption is A−2 [MASK] prompts; use with `layout.for_generation(G)`."""
        lay = self.layout
        example = self._encode(["[MASK]"] * (lay.max_seq_a_length - 2), od_labels, img_feats)
        mask = seq2seq_attention_mask(
            int(example.pop("seq_a_len")), lay.max_seq_a_length, int(example.pop("seq_len")), lay.max_seq_length,
            int(example.pop("num_regions")), lay.max_img_seq_length,
        )
        return {**example, "attention_mask": mask, "masked_pos": np.ones(lay.max_seq_length, dtype=np.int64)}
