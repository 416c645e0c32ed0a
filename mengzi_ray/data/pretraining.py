"""Oscar+ pretraining inputs (microsoft/Oscar `oscar/datasets/oscar_tsv.py`): text_a/text_b pollution with 2-/3-way
labels and BERT MLM.

Layout: [CLS] text_a [SEP] text_b [SEP] (segments 0…0 1…1), zero-padded to max_seq_length, then regions.
`text_b` is the corpus row's own text_b when it has one (imported Oscar+ corpus: the translated tags, or the QA
answers of a question row), else the image's tag string. Labels: 0 = matched, 1 = text_b swapped, num_contrast_classes − 1 =
text_a swapped (so 2-way models see 0/1 only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


PREPARED_KEYS = ("text_a_ids", "text_a_len", "text_b_ids", "text_b_len", "img_feats", "num_regions")
"""Columns of `PretrainTensorizer.prepare_batch` (the upstream stage's output, training/examples.py)."""
TEXT_COLUMNS = PREPARED_KEYS[:4]
"""The columns pollution swaps between rows (a worker's negative pool keeps only these)."""


@dataclass(frozen=True)
class Pollution:
    """Which side of each of B pairs comes from another document (`pollution_plan`).

    labels (B,) int64: 0 matched, 1 text_b swapped, num_contrast_classes − 1 text_a swapped. swap_a, swap_b (B,)
    bool. b_is_other_a (B,) bool: a swapped text_b is the other document's text_a (textb_sample_mode 0's coin)."""

    labels: np.ndarray
    swap_a: np.ndarray
    swap_b: np.ndarray
    b_is_other_a: np.ndarray

    @property
    def polluted(self) -> np.ndarray:
        """(B,) bool: the rows that need another document."""
        return self.swap_a | self.swap_b


def pollution_plan(
    has_text_b: np.ndarray, rng: np.random.Generator, texta_false_prob: float, num_contrast_classes: int,
    textb_sample_mode: int = 1,
) -> Pollution:
    """The original's dice (microsoft/Oscar `oscar/datasets/oscar_tsv.py`), B pairs at once: u ~ U(0,1) per pair;
    u > 0.5 keeps it (label 0); elif u > texta_false_prob and the pair has a text_b, text_b comes from another
    document (label 1); else text_a does (label num_contrast_classes − 1). With 0.25: 0.5/0.25/0.25. A swapped
    text_b is, per `textb_sample_mode`: 1 = the other document's text_b; 0 = a random line of it (its text_a or its
    text_b, p = 0.5 each). Draws 2B uniforms: the B dice, then B coins (drawn in both modes, so the generator
    advances the same)."""
    has_b = np.asarray(has_text_b, dtype=bool)
    u = rng.random(len(has_b))
    coin = rng.random(len(has_b))
    keep = u > 0.5
    swap_b = ~keep & (u > texta_false_prob) & has_b
    swap_a = ~keep & ~swap_b
    labels = np.where(swap_b, 1, np.where(swap_a, num_contrast_classes - 1, 0)).astype(np.int64)
    return Pollution(labels, swap_a, swap_b, swap_b & (textb_sample_mode == 0) & (coin < 0.5))


def pair_lengths(a_len: np.ndarray, b_len: np.ndarray, max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept lengths of B token pairs after the original's truncation (pop the last token of the longer side, of
    text_b on a tie, until both fit in max_total), in closed form: a pair that fits is kept; otherwise the pops
    end balanced (text_a gets the odd token) unless one side is short enough to keep whole."""
    a, b = np.asarray(a_len, dtype=np.int64), np.asarray(b_len, dtype=np.int64)
    fits = a + b <= max_total
    kept_a = np.minimum(a, np.maximum(-(-max_total // 2), max_total - b))
    return np.where(fits, a, kept_a), np.where(fits, b, max_total - kept_a)


class PretrainTensorizer:
    """Pretraining examples in two halves, so the first can run upstream of the trainer (a Ray Data stage,
    training/examples.py): `prepare_batch` tokenises each row's own text_a and text_b and pads its regions
    (deterministic); `compose_batch` lays out pairs that pollution may have recombined, truncates and masks them,
    vectorised over the batch. `example` is both halves on one row; masking takes a fixed number of uniforms per row
    row-major from the generator, so composing B rows at once equals B `example` calls with the same generator."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, layout: PretrainLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        self.ids = TokenIds.of(tokenizer)

    @property
    def side_length(self) -> int:
        """Tokens kept per side upstream: a pair never holds more than max_seq_length − 3 text tokens."""
        return self.layout.max_seq_length - 3

    def _side(self, text: str) -> tuple[np.ndarray, int]:
        ids = self.tokenizer.convert_tokens_to_ids(caption_tokens(self.tokenizer, text))[: self.side_length]
        out = np.full(self.side_length, self.ids.pad, dtype=np.int64)
        out[: len(ids)] = ids
        return out, len(ids)

    def text_sides(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> dict[str, np.ndarray]:
        """TEXT_COLUMNS of B rows (B may be 0): text_a_ids, text_b_ids (B, max_seq_length − 3) int64 padded with
        [PAD], text_a_len, text_b_len (B,). ValueError for a text_a that is empty after normalisation."""
        out: dict[str, list] = {k: [] for k in TEXT_COLUMNS}
        for text_a, text_b in zip(texts_a, texts_b):
            a_ids, a_len = self._side(text_a)
            if not a_len:
                raise ValueError(f"text_a {text_a!r} is empty after normalisation")
            for k, v in zip(TEXT_COLUMNS, (a_ids, a_len, *self._side(text_b))):
                out[k].append(v)
        return {k: np.array(v, dtype=np.int64).reshape(len(v), *((self.side_length,) if k.endswith("_ids") else ()))
                for k, v in out.items()}

    def regions(self, img_feats: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """img_feats (B, R, D) float32 (regions padded to the layout) and num_regions (B,) of B rows (B may be 0).
        ValueError for regions of the wrong shape."""
        lay = self.layout
        padded = [pad_regions(f, lay.max_img_seq_length, lay.img_feature_dim, lay.truncate_regions) for f in img_feats]
        regions = np.array([r for r, _ in padded], dtype=np.float32).reshape(len(padded), lay.max_img_seq_length, lay.img_feature_dim)
        return {"img_feats": regions, "num_regions": np.array([n for _, n in padded], dtype=np.int64)}

    def prepare_batch(
        self, texts_a: Sequence[str], texts_b: Sequence[str], img_feats: Sequence[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """PREPARED_KEYS of B rows (B may be 0): `text_sides` and `regions`. ValueError for a text_a that is empty
        after normalisation or regions of the wrong shape."""
        return {**self.text_sides(texts_a, texts_b), **self.regions(img_feats)}

    def compose_batch(self, prepared: Mapping[str, np.ndarray], labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Model inputs of B pairs given as PREPARED_KEYS columns (text sides already swapped by pollution):
        [CLS] a [SEP] b [SEP] ([CLS] a [SEP] when b is empty), segments 0…0 1…1, [PAD] to L = max_seq_length, then
        the regions. BERT masking as the original: each token but [CLS]/[SEP] with probability mlm_prob → [MASK]
        (80%), a uniform vocab id (10%) or kept (10%), its label the original id (−1 elsewhere). Per row the
        generator gives 2L uniforms (per position: the selection draw, reused for the replacement kind, then the
        random id). Returns input_ids, token_type_ids, masked_lm_labels (B, L), attention_mask (B, L + R),
        img_feats (B, R, D), next_sentence_label (B,)."""
        lay, special = self.layout, self.ids
        L, R = lay.max_seq_length, lay.max_img_seq_length
        a_len, b_len = pair_lengths(prepared["text_a_len"], prepared["text_b_len"], L - 3)
        batch = len(a_len)
        pos = np.broadcast_to(np.arange(L), (batch, L))
        a_end = a_len[:, None] + 1  # the first [SEP]
        b_start = a_end + 1
        length = np.where(b_len > 0, a_len + b_len + 3, a_len + 2)[:, None]
        in_a = (pos >= 1) & (pos < a_end)
        in_b = (pos >= b_start) & (pos < b_start + b_len[:, None])
        a_tok = np.take_along_axis(np.asarray(prepared["text_a_ids"]), np.clip(pos - 1, 0, self.side_length - 1), axis=1)
        b_tok = np.take_along_axis(np.asarray(prepared["text_b_ids"]), np.clip(pos - b_start, 0, self.side_length - 1), axis=1)
        ids = np.where(in_a, a_tok, np.where(in_b, b_tok, np.where(pos < length, special.sep, special.pad)))
        ids[:, 0] = special.cls
        segments = ((pos >= b_start) & (pos < length)).astype(np.int64)

        draws = rng.random((batch, L, 2))
        chosen = (pos < length) & (ids != special.cls) & (ids != special.sep) & (draws[..., 0] < lay.mlm_prob)
        kind = draws[..., 0] / max(lay.mlm_prob, np.finfo(np.float64).tiny)
        random_ids = np.floor(draws[..., 1] * special.vocab_size).astype(np.int64)
        masked_lm_labels = np.where(chosen, ids, -1)
        ids = np.where(chosen & (kind < 0.8), special.mask, np.where(chosen & (kind < 0.9), random_ids, ids))
        num_regions = np.asarray(prepared["num_regions"])
        attention_mask = np.concatenate([pos < length, np.arange(R)[None, :] < num_regions[:, None]], axis=1)
        return {
            "input_ids": ids, "attention_mask": attention_mask.astype(np.int64), "token_type_ids": segments,
            "img_feats": np.asarray(prepared["img_feats"]), "masked_lm_labels": masked_lm_labels,
            "next_sentence_label": np.asarray(labels, dtype=np.int64),
        }

    def example(self, text_a: str, text_b: str, label: int, img_feats: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One (already polluted) pair: `prepare_batch` and `compose_batch` on a batch of one."""
        batch = self.compose_batch(self.prepare_batch([text_a], [text_b], [img_feats]), np.array([label]), rng)
        return {k: v[0] for k, v in batch.items()}
