"""Oscar+ pretraining inputs (microsoft/Oscar `oscar/datasets/oscar_tsv.py`): text_a/text_b pollution with 2-/3-way
labels and BERT MLM.

Layout: [CLS] text_a [SEP] text_b [SEP] (segments 0…0 1…1), zero-padded to max_seq_length, then regions.
`text_b` is the corpus row's own text_b when it has one (imported Oscar+ corpus: the translated tags, or the QA
answers of a question row), else the image's tag string. Labels: 0 = matched, 1 = text_b swapped, num_contrast_classes − 1 =
text_a swapped (so 2-way models see 0/1 only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.common import TokenIds, pad_regions
from mengzi_ray.text import caption_tokens


@dataclass(frozen=True)
class PretrainLayout:
    max_seq_length: int = 35
    max_img_seq_length: int = 50
    img_feature_dim: int = 2054
    truncate_regions: bool = True  # False: more than max_img_seq_length regions is an error
    mlm_prob: float = 0.15
    texta_false_prob: float = 0.25

    @property
    def num_contrast_classes(self) -> int:
        """3-way iff texta_false_prob < 0.5 and > 0 (use_b = 1), as the original decides."""
        return 3 if 0.0 < self.texta_false_prob < 0.5 else 2


def pollute(
    text_a: str,
    text_b: str,
    rng: np.random.Generator,
    texta_false_prob: float,
    num_contrast_classes: int,
    other_text_a: Callable[[], str],
    other_text_b: Callable[[], str],
) -> tuple[str, str, int]:
    """With u ~ U(0,1): u > 0.5 keeps the pair (label 0); elif u > texta_false_prob and text_b is non-empty, text_b
    comes from another image (label 1); else text_a does (label num_contrast_classes − 1). With 0.25: 0.5/0.25/0.25.
    `other_*` draw the text of a random document of a *different* image (the caller guarantees the difference)."""
    u = rng.random()
    if u > 0.5:
        return text_a, text_b, 0
    if u > texta_false_prob and text_b:
        return text_a, other_text_b(), 1
    return other_text_a(), text_b, num_contrast_classes - 1


def pretrain_pair(
    text_a: str,
    text_b: str,
    rng: np.random.Generator,
    texta_false_prob: float,
    num_contrast_classes: int,
    other: Callable[[], tuple[str, str]],
    textb_sample_mode: int = 1,
) -> tuple[str, str, int]:
    """One Oscar+ pretraining pair from a corpus row (text_a, its text_b: tags, or the answers of a question row).

    `other()` returns (text_a, text_b) of a random document of a different image. The polluted text_b is, as in
    the original's `textb_sample_mode`: 1 = that document's text_b; 0 = a random line of it (text_a or text_b,
    p = 0.5 each). Labels and probabilities as in `pollute`."""

    def other_text_b() -> str:
        a, b = other()
        if textb_sample_mode == 0 and rng.random() < 0.5:
            return a
        return b

    return pollute(text_a, text_b, rng, texta_false_prob, num_contrast_classes,
                   other_text_a=lambda: other()[0], other_text_b=other_text_b)


def truncate_pair(a: list[str], b: list[str], max_total: int) -> None:
    """Pop from the end of the longer list until len(a) + len(b) <= max_total (in place)."""
    while len(a) + len(b) > max_total:
        (a if len(a) > len(b) else b).pop()


class PretrainTensorizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, layout: PretrainLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        self.ids = TokenIds.of(tokenizer)

    def example(
        self, text_a: str, text_b: str, label: int, img_feats: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """One (already polluted) pair → input_ids, attention_mask (L+R,), token_type_ids, img_feats,
        masked_lm_labels (L,) with −1 for non-targets, next_sentence_label ()."""
        lay = self.layout
        a, b = caption_tokens(self.tokenizer, text_a), caption_tokens(self.tokenizer, text_b)
        if not a:
            raise ValueError(f"text_a {text_a!r} is empty after normalisation")
        truncate_pair(a, b, lay.max_seq_length - 3)
        tokens = ["[CLS]", *a, "[SEP]", *b, "[SEP]"] if b else ["[CLS]", *a, "[SEP]"]
        segments = [0] * (len(a) + 2) + [1] * (len(tokens) - len(a) - 2)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        labels = [-1] * len(ids)
        for i, token in enumerate(tokens):
            if token in ("[CLS]", "[SEP]") or rng.random() >= lay.mlm_prob:
                continue
            labels[i] = ids[i]
            draw = rng.random()
            if draw < 0.8:
                ids[i] = self.ids.mask
            elif draw < 0.9:
                ids[i] = int(rng.integers(0, self.ids.vocab_size))
        pad = lay.max_seq_length - len(ids)
        feats, num_regions = pad_regions(img_feats, lay.max_img_seq_length, lay.img_feature_dim, lay.truncate_regions)
        text_mask = [1] * len(ids) + [0] * pad
        region_mask = [1] * num_regions + [0] * (lay.max_img_seq_length - num_regions)
        return {
            "input_ids": np.array(ids + [self.ids.pad] * pad, dtype=np.int64),
            "attention_mask": np.array(text_mask + region_mask, dtype=np.int64),
            "token_type_ids": np.array(segments + [0] * pad, dtype=np.int64),
            "img_feats": feats,
            "masked_lm_labels": np.array(labels + [-1] * pad, dtype=np.int64),
            "next_sentence_label": np.array(label, dtype=np.int64),
        }
