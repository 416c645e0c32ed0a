"""The three tasks and SCST without Ray: batches, losses that train, validation metrics, negatives, data
position, checkpoint state; sampling gives differentiable log-probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mengzi_ray.config import load_card
from mengzi_ray.data.records import ImageRecord, load_image_records
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.modeling.generation import sample
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import CaptionCard, PretrainCard, RetrievalCard
from mengzi_ray.training.jobs import prepare_init
from mengzi_ray.training.loop import DataPosition, micro_batches
from mengzi_ray.training.tasks import NegativePool, task_for

JOBS = Path(__file__).resolve().parents[2] / "jobs"
CARDS = {"caption": (CaptionCard, "caption_tiny.yaml"), "retrieval": (RetrievalCard, "retrieval_tiny.yaml"),
         "pretrain": (PretrainCard, "pretrain_tiny.yaml"), "scst": (CaptionCard, "caption_scst.yaml")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=12, num_val=4).root


def setup(kind: str, data: Path, tmp_path: Path):
    cls, name = CARDS[kind]
    overrides = [f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={tmp_path}"]
    if kind == "scst":  # the production SCST card, made tiny
        overrides += ["model.init_from=null", "model.tiny={}", "scaling.num_workers=1", "batch.global_batch_size=4",
                      "batch.per_worker_batch_size=4", "caption.max_seq_a_length=24", "caption.max_seq_length=30",
                      "caption.max_img_seq_length=5", "caption.max_gen_length=22", "scst.sample_n=3"]
    card = load_card(cls, JOBS / name, overrides)
    init_dir, _ = prepare_init(card, str(tmp_path / "run"))
    task = task_for(card, load_tokenizer(init_dir))
    model = task.model_class.from_pretrained(init_dir, **task.config_overrides())
    train = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "train")
    val = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "val")
    rows = train if task.per_image_train else [ImageRecord(r.image_id, r.features, r.od_labels, [t]) for r in train for t in r.texts]
    return task, model, rows, val


@pytest.mark.parametrize("kind", ["caption", "retrieval", "pretrain", "scst"])
def test_task_batch_loss_and_validation(kind: str, data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task, model, rows, val = setup(kind, data, tmp_path)
    rng = np.random.default_rng(0)
    pool = NegativePool(64, rng)
    pool.add(rows)
    batch = {k: torch.as_tensor(v) for k, v in task.make_batch(rows[:4], rng, pool).items()}
    assert (task.upstream() is not None) == (kind != "scst")  # SCST keeps make_batch in the worker
    if kind == "retrieval":
        assert batch["labels"].tolist() == [1] * 4 + [0] * 4  # positives, then one negative each
    model.train()
    loss = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    metrics = task.validate(model, val)
    assert np.isfinite(metrics["val_loss"])
    expected = {"caption": "val_cider", "scst": "val_cider", "retrieval": "val_rsum", "pretrain": "val_mlm_acc"}[kind]
    assert expected in metrics and metrics[expected] >= 0


def test_validation_leaves_the_drop_worst_counter_alone(data: Path, tmp_path: Path) -> None:
    task, model, rows, val = setup("caption", data, tmp_path)
    model.loss.calls = 7
    task.validate(model, val)
    assert task.state(model) == {"drop_worst_calls": 7}
    task.load_state(model, {"drop_worst_calls": 3})
    assert model.loss.calls == 3


def test_negative_pool_draws_another_image() -> None:
    rows = [ImageRecord(f"img{i % 3}", np.zeros((1, 4), np.float32), "", [f"t{i}"]) for i in range(9)]
    pool = NegativePool(5, np.random.default_rng(0))
    pool.add(rows)
    # a ring of the most recent rows: 9 added at once to 5 slots keeps rows 4..8
    assert pool.ring.size == 5 and sorted(r.texts[0] for r in pool.ring.columns["record"]) == [f"t{i}" for i in range(4, 9)]
    assert all(row.image_id != "img1" for row in pool.others(["img1"] * 50))


class FakeShard:
    """iter_batches over a fixed pyarrow table, like a DataIterator (one epoch per call)."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def iter_batches(self, *, batch_size: int, **_: object):
        self.calls += 1
        for start in range(0, self.table.num_rows - batch_size + 1, batch_size):
            yield self.table.slice(start, batch_size)


def test_micro_batches_track_and_skip_the_data_position(data: Path) -> None:
    import pyarrow.parquet as pq

    from mengzi_ray.training.examples import _attach_texts, read_text_table

    joined = _attach_texts(pq.read_table(data / "features"), read_text_table(str(data / "text.jsonl"), "train", "caption"), False)
    per_epoch = joined.num_rows // 5
    position = DataPosition()
    stream = micro_batches(FakeShard(joined), 5, 16, position)
    seen = [next(stream)[0].texts[0] for _ in range(per_epoch + 2)]
    assert (position.epoch, position.batches) == (1, 2)
    resumed = micro_batches(FakeShard(joined), 5, 16, DataPosition(0, 3))
    assert next(resumed)[0].texts[0] == seen[3]  # skips the batches already consumed in the epoch
    shard = FakeShard(joined)
    cached = micro_batches(shard, 5, 16, DataPosition(), cache=True)
    texts = [r.texts[0] for _ in range(3 * per_epoch) for r in next(cached)]
    assert shard.calls == 1 and len(texts) == 3 * per_epoch * 5  # later epochs come from the worker's cache
    too_small = micro_batches(FakeShard(joined.slice(0, 4)), 5, 16, DataPosition())
    with pytest.raises(ValueError, match="fewer rows than one micro-batch \\(5\\)"):
        next(too_small)  # a shard without one full batch fails instead of looping over empty epochs


def test_sampling_is_differentiable_and_greedy_at_low_temperature(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task, model, rows, _ = setup("scst", data, tmp_path)
    b = {k: torch.as_tensor(v) for k, v in task.make_batch(rows[:3], np.random.default_rng(0), None).items()}
    inputs = (b["input_ids"], b["attention_mask"], b["token_type_ids"], b["img_feats"])
    model.eval()
    out = sample(model.bert, model.cls, model.special_ids(), *inputs, max_length=22, num_samples=2, temperature=1.0,
                 od_labels_start_posid=model.config.max_seq_a_length)
    assert out.sequences.shape == (6, 22) and out.scores.shape == (6,) and out.scores.requires_grad
    assert bool((out.scores <= 0).all())
    cold = sample(model.bert, model.cls, model.special_ids(), *inputs, max_length=22, num_samples=1, temperature=1e-4,
                  od_labels_start_posid=model.config.max_seq_a_length)
    greedy = model.generate(*inputs, num_beams=1, max_length=22).sequences[:, 0]
    assert torch.equal(cold.sequences, greedy)


def test_prepare_init_hands_workers_an_absolute_local_dir(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train moves a worker's working directory, so a relative `model.init_from` must reach it resolved."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "ce").mkdir(parents=True)
    card = load_card(CaptionCard, JOBS / "caption_tiny.yaml", [f"data.features={data}/features", f"data.text={data}/text.jsonl",
                                                               "model.tiny=null", "model.init_from=models/ce"])
    init_dir, from_bert = prepare_init(card, str(tmp_path / "run"))
    assert (init_dir, from_bert) == (str(tmp_path / "models" / "ce"), False)
    remote = load_card(CaptionCard, JOBS / "caption_tiny.yaml", ["model.tiny=null", "model.init_from=s3://bucket/ce"])
    assert prepare_init(remote, "s3://bucket/run") == ("s3://bucket/ce", False)
