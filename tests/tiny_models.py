"""Tiny random-init model dirs for the serving tests and the serving benchmark (bench/bench_serve.py): a captioner
and a retrieval model whose vocab is built from a feature dataset's own captions and tags.

Their outputs mean nothing (random weights); they exercise the whole serving path at the real layouts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mengzi_ray.data.records import read_text_rows
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning, OscarForRetrieval
from mengzi_ray.text import build_vocab, write_vocab

# Small enough for 2 CPU cores, with the caption/tag/region budgets of a real layout.
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, use_img_layernorm=True)
TINY_LAYOUT = dict(max_position_embeddings=64, max_seq_a_length=24, max_seq_length=30, max_img_seq_length=10)


def write_tiny_models(text_path: str | Path, tags: list[str], out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `<out_dir>/caption` (OscarForCaptioning) and `<out_dir>/retrieval` (OscarForRetrieval) model dirs with
    a vocab built from the texts of `text_path` (jsonl) plus `tags`; returns (caption dir, retrieval dir)."""
    out = Path(out_dir)
    vocab_file = write_vocab(build_vocab([row["text"] for row in read_text_rows(text_path)] + list(tags)), out / "vocab.txt")
    vocab_size = sum(1 for _ in vocab_file.open(encoding="utf-8"))
    config = OscarConfig(vocab_size=vocab_size, **TINY_SHAPE, **TINY_LAYOUT)
    torch.manual_seed(seed)
    caption_dir = OscarForCaptioning(config).save_pretrained(out / "caption", vocab_file=vocab_file)
    retrieval_dir = OscarForRetrieval(config).save_pretrained(out / "retrieval", vocab_file=vocab_file)
    return Path(caption_dir), Path(retrieval_dir)
