"""Captioning inputs (docs/oscar-formats.md §3.1): "seq2seq by masking" train layout and the [MASK]-prompt test layout.

Text layout, A = caption budget (max_seq_a_length), L = text length (max_seq_length), R = regions:
    [CLS] caption… [SEP] [PAD]… (up to A) │ tags… [SEP] (segment 1) │ [PAD]… (up to L) ‖ R region rows
Attention mask (L+R)×(L+R), 1 = row may attend column: the caption attends causally to itself and fully to
tags and regions; tags and regions attend to each other but never to the caption; padding rows/columns are 0.
"""

from __future__ import annotations

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


def seq2seq_attention_mask(seq_a_len: int, a: int, seq_len: int, num_text: int, num_regions: int, max_regions: int) -> np.ndarray:
    """The (L+R)×(L+R) 0/1 mask: C=[0,seq_a_len) causal, Lb=[a,seq_len), Rg=[L, L+num_regions)."""
    n = num_text + max_regions
    mask = np.zeros((n, n), dtype=np.int64)
    c_end, l_start, l_end = seq_a_len, a, seq_len
    r_start, r_end = num_text, num_text + num_regions
    mask[:c_end, :c_end] = np.tril(np.ones((c_end, c_end), dtype=np.int64))
    mask[:c_end, l_start:l_end] = 1
    mask[:c_end, r_start:r_end] = 1
    mask[l_start:l_end, l_start:l_end] = 1
    mask[r_start:r_end, r_start:r_end] = 1
    mask[l_start:l_end, r_start:r_end] = 1
    mask[r_start:r_end, l_start:l_end] = 1
    return mask


class CaptionTensorizer:
    """Turns (caption, od-label string, region features) into the original's captioning tensors (numpy)."""

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

    def _assemble(self, tokens: list[str], segments: list[int], seq_a_len: int, seq_len: int, img_feats: np.ndarray) -> dict[str, np.ndarray]:
        lay = self.layout
        pad = lay.max_seq_length - seq_len
        input_ids = np.array(self.tokenizer.convert_tokens_to_ids(tokens) + [self.ids.pad] * pad, dtype=np.int64)
        token_type_ids = np.array(segments + [0] * pad, dtype=np.int64)
        feats, num_regions = pad_regions(img_feats, lay.max_img_seq_length, lay.img_feature_dim, lay.truncate_regions)
        mask = seq2seq_attention_mask(
            seq_a_len, lay.max_seq_a_length, seq_len, lay.max_seq_length, num_regions, lay.max_img_seq_length
        )
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_type_ids, "img_feats": feats}

    def train_example(
        self, caption: str, od_labels: str | None, img_feats: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Train layout with up to max_masked_tokens masked caption tokens (the closing [SEP] included)."""
        words = caption_tokens(self.tokenizer, caption)
        if not words:
            raise ValueError(f"caption {caption!r} is empty after normalisation")
        tokens, segments, seq_a_len, seq_len = self._text(words, od_labels)
        lay = self.layout
        candidates = list(range(1, seq_a_len))  # not [CLS]; the closing [SEP] is, so the model learns to stop
        rng.shuffle(candidates)
        num_masked = min(max(round(lay.mask_prob * seq_a_len), 1), lay.max_masked_tokens)
        chosen = sorted(candidates[:num_masked])
        originals = [tokens[i] for i in chosen]
        for i in chosen:
            if rng.random() <= 0.8:
                tokens[i] = "[MASK]"
            elif rng.random() <= 0.5:
                # Original quirk kept: randint is inclusive, so id == vocab size (out of range) becomes [UNK].
                drawn = int(rng.integers(0, self.ids.vocab_size + 1))
                tokens[i] = self.tokenizer.convert_ids_to_tokens(drawn) if drawn < self.ids.vocab_size else "[UNK]"
        example = self._assemble(tokens, segments, seq_a_len, seq_len, img_feats)
        masked_pos = np.zeros(lay.max_seq_length, dtype=np.int64)
        masked_pos[chosen] = 1
        masked_ids = np.zeros(lay.max_masked_tokens, dtype=np.int64)
        masked_ids[: len(chosen)] = self.tokenizer.convert_tokens_to_ids(originals)
        return {**example, "masked_pos": masked_pos, "masked_ids": masked_ids}

    def test_example(self, od_labels: str | None, img_feats: np.ndarray) -> dict[str, np.ndarray]:
        """Test layout: the caption is A−2 [MASK] prompts; use with `layout.for_generation(G)`."""
        prompts = ["[MASK]"] * (self.layout.max_seq_a_length - 2)
        tokens, segments, seq_a_len, seq_len = self._text(prompts, od_labels)
        example = self._assemble(tokens, segments, seq_a_len, seq_len, img_feats)
        return {**example, "masked_pos": np.ones(self.layout.max_seq_length, dtype=np.int64)}
