"""Shared fixtures: tiny random-init Oscar configs and model dirs the tests make themselves (no hub, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A hand-made vocab: bert-base-chinese puts [PAD]=0, [UNK]=100, [CLS]=101…; this tiny one uses other ids on purpose,
# so any code that assumes fixed ids fails here.
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "红", "蓝", "圆", "方", "的", "在", "左", "右", "边", "形", "色"]

# A caption training card for tests that load cards without running them (tune cards, the model export).
CAPTION_CARD_YAML = """\
run: {name: cap, storage_path: /tmp/unused}
scaling: {num_workers: 2}
data: {features: /tmp/f, text: /tmp/t.jsonl}
model: {tiny: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}
optim: {learning_rate: 1.0e-4}
batch: {global_batch_size: 16, per_worker_batch_size: 4}
schedule: {max_steps: 40}
validation: {every_steps: 10}
checkpoint: {metric: val_cider}
"""


@pytest.fixture
def tiny_vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab" / "vocab.txt"
    path.parent.mkdir()
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return path


def tiny_config(**overrides):
    from mengzi_ray.modeling import OscarConfig

    values = dict(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        img_feature_dim=12,
        use_img_layernorm=True,
        max_seq_a_length=8,
        max_seq_length=12,
        max_img_seq_length=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return OscarConfig(**values)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def joined_train_rows(tmp_path_factory):
    """(dataset root, Arrow table): a synthetic dataset (12 train, 4 val images) and its train captions joined to
    their features as the training job joins them, one caption per row (training/examples.py)."""
    import pyarrow.parquet as pq

    from mengzi_ray.synthetic import write_synthetic_dataset
    from mengzi_ray.training.examples import _attach_texts, read_text_table

    root = write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=12, num_val=4).root
    texts = read_text_table(str(root / "text.jsonl"), "train", "caption")
    return root, _attach_texts(pq.read_table(root / "features"), texts, False)
