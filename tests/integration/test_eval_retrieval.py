"""Retrieval evaluation on the synthetic set: a tiny retriever fine-tuned in the fixture ranks far above chance,
and the distributed scoring gives bit-identical scores with 1 or 3 actors and any chunk size."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mengzi_ray.cli import main as cli_main
from mengzi_ray.config import ConfigError, validate_card
from mengzi_ray.data.records import load_image_records
from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer, negative_pair
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.evaluation.card import EvaluateCard
from mengzi_ray.evaluation.jobs import run_evaluate
from mengzi_ray.modeling import OscarConfig, OscarForRetrieval
from mengzi_ray.text import build_vocab, load_tokenizer, write_vocab
from mengzi_ray.inference import collate
from mengzi_ray.training.optim import build_optimizer, warmup_linear

NUM_VAL = 20
CAPTIONS = 3
LAYOUT = RetrievalLayout(max_seq_length=32, max_img_seq_length=4)
STEPS = 300


def _fine_tune_retriever(data, out: Path) -> Path:
    """A 2-layer retriever trained for STEPS steps with the original's positive / sampled-negative scheme."""
    torch.manual_seed(0)
    train = load_image_records(data.features_path, data.text_path, "train")
    vocab_dir = out / "init"
    write_vocab(build_vocab([t for r in train for t in r.texts] + [r.od_labels for r in train]), vocab_dir / "vocab.txt")
    tokenizer = load_tokenizer(vocab_dir)
    config = OscarConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, use_img_layernorm=True, max_seq_length=LAYOUT.max_seq_length,
        max_seq_a_length=LAYOUT.max_seq_length, max_img_seq_length=LAYOUT.max_img_seq_length,
    )
    model = OscarForRetrieval(config)
    tensorizer = RetrievalTensorizer(tokenizer, LAYOUT)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    scheduler = warmup_linear(optimizer, 20, STEPS)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(STEPS):
        examples = []
        for i in rng.choice(len(train), size=16):
            record = train[i]
            caption = record.texts[rng.integers(len(record.texts))]
            examples.append(tensorizer.example(caption, record.od_labels, record.features, label=1))
            swap, other = negative_pair(int(i), len(train), rng)
            if swap == "caption":
                wrong = train[other].texts[rng.integers(len(train[other].texts))]
                examples.append(tensorizer.example(wrong, record.od_labels, record.features, label=0))
            else:
                examples.append(tensorizer.example(caption, train[other].od_labels, train[other].features, label=0))
        loss = model(**collate(examples)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.save_pretrained(out / "model", vocab_file=vocab_dir / "vocab.txt")


@pytest.fixture(scope="module")
def retrieval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_retrieval")
    data = write_synthetic_dataset(root / "data", num_train=120, num_val=NUM_VAL, seed=3)
    start = time.perf_counter()
    model_dir = _fine_tune_retriever(data, root)
    print(f"fine-tuned the tiny retriever in {time.perf_counter() - start:.1f}s")
    return data, model_dir, root


def _card(data, model_dir: Path, out: Path, **overrides) -> EvaluateCard:
    card = {
        "task": "retrieval",
        "model_dir": str(model_dir),
        "features": str(data.features_path.parent),
        "references": str(data.text_path),
        "split": "val",
        "output_dir": str(out),
        "actors": {"num_actors": 1, "batch_size": 32},
        "retrieval": {"captions_per_image": CAPTIONS, "chunk_size": 256},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        card[section][field] = value
    return validate_card(EvaluateCard, card, "test")


def test_fine_tuned_retriever_far_above_chance_and_independent_of_actors(ray_local, retrieval_setup):
    data, model_dir, root = retrieval_setup
    one = run_evaluate(_card(data, model_dir, root / "one"))
    three = run_evaluate(_card(data, model_dir, root / "three", actors__num_actors=3, retrieval__chunk_size=96))
    print("1 actor:", one["metrics"], f"{one['pairs_per_second']} pairs/s")
    print("3 actors:", three["metrics"], f"{three['pairs_per_second']} pairs/s")
    assert one["num_pairs"] == NUM_VAL * NUM_VAL * CAPTIONS
    scores_one = np.load(root / "one" / "scores.npy")
    scores_three = np.load(root / "three" / "scores.npy")
    assert scores_one.shape == (NUM_VAL, NUM_VAL * CAPTIONS)
    assert np.array_equal(scores_one, scores_three)  # bit-identical, so the ranks cannot differ
    assert one["metrics"] == three["metrics"]
    # Chance (random scores): i2t R@1 = 3/60, t2i R@1 = 1/20, rsum ≈ 1.5. Measured: 0.20, 0.17, rsum 3.3.
    assert one["metrics"]["i2t_R@1"] >= 3 * 0.05
    assert one["metrics"]["t2i_R@1"] >= 3 * 0.05
    assert one["metrics"]["rsum"] >= 2.5
    # TF-IDF beside the cross-encoder (this dir has no dual encoder); a shortlist of all 60 texts is its ranking
    assert "dual_encoder" not in one and set(one["tfidf"]["two_stage"]) == {"20", "100"}
    assert one["tfidf"]["two_stage"]["100"] == one["metrics"]
    assert 0 <= one["tfidf"]["metrics"]["rsum"] <= 6
    saved = json.loads((root / "one" / "metrics.json").read_text())
    assert saved["metrics"] == one["metrics"] and saved["num_images"] == NUM_VAL


def test_rerank_mode_over_candidate_lists(ray_local, retrieval_setup):
    data, model_dir, root = retrieval_setup
    ids = [f"val/{i:06d}" for i in range(NUM_VAL)]
    # Each query: its own caption 0 plus caption 0 of the next 4 images (5 candidates, one correct).
    candidates = {q: [[ids[(n + d) % NUM_VAL], 0] for d in range(5)] for n, q in enumerate(ids)}
    (root / "candidates.json").write_text(json.dumps(candidates))
    card = _card(
        data, model_dir, root / "rerank", retrieval__mode="rerank", retrieval__candidates=str(root / "candidates.json")
    )
    result = run_evaluate(card)
    assert result["num_pairs"] == NUM_VAL * 5 and result["num_queries"] == NUM_VAL
    assert set(result["metrics"]) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "rsum"}
    assert result["metrics"]["i2t_R@5"] == 1.0  # the correct caption is always among the 5
    assert result["metrics"]["i2t_R@1"] > 0.4  # chance 0.2


def test_bad_gallery_inputs_are_errors_with_counts(ray_local, retrieval_setup, tmp_path):
    data, model_dir, root = retrieval_setup
    with pytest.raises(ConfigError, match=r"num_images: 50 images asked for, only 20"):
        run_evaluate(_card(data, model_dir, tmp_path / "a", retrieval__num_images=50))
    with pytest.raises(ConfigError, match=r"20 of 20 gallery images have fewer than 4 captions"):
        run_evaluate(_card(data, model_dir, tmp_path / "b", retrieval__captions_per_image=4))
    keys = tmp_path / "keys.txt"
    keys.write_text("val/000001\nval/999999\ntrain/000000\n")
    with pytest.raises(ConfigError, match=r"2 of 3 keys have no references or no features"):
        run_evaluate(_card(data, model_dir, tmp_path / "c", retrieval__image_keys=str(keys)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty gallery"):
        run_evaluate(_card(data, model_dir, tmp_path / "d", retrieval__image_keys=str(empty)))


def test_cli_runs_the_tiny_card_with_overrides(ray_local, retrieval_setup, tmp_path):
    data, model_dir, _ = retrieval_setup
    status = cli_main(
        [
            "evaluate", "--config", "jobs/eval_retrieval_tiny.yaml",
            "--set", f"model_dir={model_dir}", "--set", f"features={data.features_path.parent}",
            "--set", f"references={data.text_path}", "--set", f"output_dir={tmp_path}",
            "--set", "retrieval.num_images=8",
        ]
    )
    assert status == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_pairs"] == 8 * 8 * CAPTIONS
