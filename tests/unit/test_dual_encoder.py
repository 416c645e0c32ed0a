"""The dual-encoder first stage without Ray: each side's inputs recombine into the cross-encoder's, the task's loss
trains both sides and the distillation, the heads travel in the model dir (and a dir without them still loads),
embeddings do not depend on their batch, and the all-gather hands every worker's negatives to the loss."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mengzi_ray.config import ConfigError, load_card
from mengzi_ray.data.dual_encoder import DualEncoderTensorizer
from mengzi_ray.data.records import ImageRecord, load_image_records
from mengzi_ray.data.retrieval import RetrievalLayout, RetrievalTensorizer
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.inference.embedder import DualEmbedder, embed_sides
from mengzi_ray.modeling import OscarForRetrieval
from mengzi_ray.inference import collate
from mengzi_ray.modeling.dual_encoder import (contrastive_loss, distill_loss, gather_with_grad, hard_negatives,
                                             match_log_odds, rank_loss)
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import RetrievalCard
from mengzi_ray.training.dual_objective import NegativeBank
from mengzi_ray.training.jobs import prepare_init
from mengzi_ray.training.tasks import NegativePool, task_for

JOBS = Path(__file__).resolve().parents[2] / "jobs"
DUAL = ["retrieval.dual_encoder.enabled=true", "retrieval.dual_encoder.dim=32", "retrieval.dual_encoder.hard_negatives=2",
        "retrieval.max_seq_length=40"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=12, num_val=4, unique=True).root


def setup(data: Path, tmp_path: Path, extra: list[str] = DUAL):
    overrides = [f"data.features={data}/features", f"data.text={data}/text.jsonl", f"run.storage_path={tmp_path}", *extra]
    card = load_card(RetrievalCard, JOBS / "retrieval_tiny.yaml", overrides)
    init_dir, _ = prepare_init(card, str(tmp_path / "run"))
    task = task_for(card, load_tokenizer(init_dir))
    model = task.model_class.from_pretrained(init_dir, **task.config_overrides())
    train = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "train")
    val = load_image_records(data / "features/part-0.parquet", data / "text.jsonl", "val")
    rows = [ImageRecord(r.image_id, r.features, r.od_labels, [t]) for r in train for t in r.texts]
    return card, task, model, rows, val


@pytest.mark.parametrize("mask_type", ["CLR", "CR"])
def test_the_two_sides_recombine_into_the_cross_encoder_input(data: Path, tmp_path: Path, mask_type: str) -> None:
    _, task, _, rows, _ = setup(data, tmp_path)
    layout = RetrievalLayout(max_seq_length=24, max_img_seq_length=5, img_feature_dim=2054, att_mask_type=mask_type)
    cross, dual = RetrievalTensorizer(task.tokenizer, layout), DualEncoderTensorizer(task.tokenizer, layout)
    for caption_row, image_row in [(rows[0], rows[5]), (rows[7], rows[2])]:  # 24 tokens: long captions cut tags
        want = cross.example(caption_row.texts[0], image_row.od_labels, image_row.features)
        got = dual.cross_example(dual.text_side(caption_row.texts[0]), dual.image_side(image_row.od_labels, image_row.features))
        assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    image = dual.image_side(rows[0].od_labels, rows[0].features)
    assert image["attention_mask"].shape == (24 + 5,) and image["token_type_ids"][1] == 1  # tags are segment 1
    with pytest.raises(ValueError, match="empty after normalisation"):
        dual.text_side("  ")


def test_dual_loss_trains_both_sides_and_reports_its_own_recall(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    card, task, model, rows, val = setup(data, tmp_path)
    rng = np.random.default_rng(0)
    pool = NegativePool(64, rng)
    pool.add(rows)
    batch = {k: torch.as_tensor(v) for k, v in task.make_batch(rows[:6], rng, pool).items()}
    assert batch["text_side.input_ids"].shape == (6, 40) and batch["image_side.img_feats"].shape[0] == 6
    model.train()
    loss = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("dual.text_proj.weight", "dual.image_proj.weight", "classifier.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.training  # the teacher pass put the model back in train mode
    metrics = task.validate(model, val)
    assert {"val_rsum", "val_dual_rsum", "val_dual_t2i_R@1"} <= metrics.keys()
    assert "val_dual_rsum" in card.metric_names()


def test_distillation_pulls_the_student_towards_the_teacher() -> None:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    candidates = torch.tensor([[0, 1, 2], [1, 0, 3], [2, 3, 0], [3, 2, 1]])
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[3, 2] = False  # a missing hard negative takes no part
    teacher = torch.tensor([[5.0, 0.0, -1.0]] * 4)
    loss = distill_loss(text, image, candidates, valid, teacher, 0.05, 1.0)
    assert loss > 0
    optimiser = torch.optim.SGD([text], lr=0.05)
    for _ in range(30):
        optimiser.zero_grad()
        distill_loss(text, image, candidates, valid, teacher, 0.05, 1.0).backward()
        optimiser.step()
    assert distill_loss(text, image, candidates, valid, teacher, 0.05, 1.0) < loss / 2
    student = (text[:, None, :] * image[candidates]).sum(-1).detach() / 0.05  # a student equal to its teacher: KL 0
    zero = distill_loss(text.detach(), image, candidates, torch.ones_like(valid), student, 0.05, 1.0)
    assert float(zero) == pytest.approx(0, abs=1e-5)


def test_rank_loss_puts_the_own_image_first_and_ignores_missing_negatives() -> None:
    odds = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 100.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    want = (np.log(1 + 2 * np.exp(-5.0)) + np.log(1 + np.exp(5.0))) / 2
    assert float(rank_loss(odds, valid)) == pytest.approx(want, rel=1e-5)
    logits = torch.tensor([[0.0, 2.0], [1.0, -0.5]])
    assert torch.allclose(match_log_odds(logits), torch.tensor([2.0, -1.5]))


def test_the_cross_rank_loss_trains_the_cross_encoder_on_the_dual_encoders_hard_pairs(data: Path, tmp_path: Path) -> None:
    """Without dropout, the loss with cross_rank_weight w is the loss without it + w × the listwise CE of the
    cross-encoder over [own image, hard negatives] built by hand; a few steps on that term alone lower it."""
    torch.manual_seed(0)
    _, task, model, rows, _ = setup(data, tmp_path, [*DUAL, "retrieval.dual_encoder.cross_rank_weight=0.5"])
    rng = np.random.default_rng(0)
    pool = NegativePool(64, rng)
    pool.add(rows)
    batch = {k: torch.as_tensor(v) for k, v in task.make_batch(rows[:6], rng, pool).items()}
    dual, section = task.dual, task.dual.section
    model.eval()
    ranked = task.loss(model, batch)
    dual.section = section.model_copy(update={"cross_rank_weight": 0.0})
    plain = task.loss(model, batch)

    text = {k: batch[f"text_side.{k}"] for k in ("input_ids", "attention_mask")}
    image = {k: batch[f"image_side.{k}"] for k in ("input_ids", "attention_mask", "token_type_ids", "img_feats")}
    with torch.no_grad():
        negatives, valid = hard_negatives(model.embed_texts(**text), model.embed_images(**image), batch["dual_image_key"], 2)
    candidates = torch.cat([torch.arange(6)[:, None], negatives], dim=1)
    valid = torch.cat([torch.ones(6, 1, dtype=torch.bool), valid], dim=1)
    side = lambda d, i: {k: v[i].numpy() for k, v in d.items()}  # noqa: E731
    pairs = collate([dual.tz.cross_example(side(text, i), side(image, j)) for i in range(6) for j in candidates[i].tolist()])

    def listwise() -> torch.Tensor:
        return rank_loss(match_log_odds(model(**pairs).logits).view(6, 3), valid)

    before = listwise().item()
    assert (ranked - plain).item() == pytest.approx(0.5 * before, rel=1e-4, abs=1e-6)
    dual.section = section.model_copy(update={"cross_rank_weight": 1.0, "contrastive_weight": 0.0, "distill_weight": 0.0})
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(8):
        optimiser.zero_grad()
        (task.loss(model, batch) - model(**{k: v for k, v in batch.items() if "." not in k and k != "dual_image_key"}).loss).backward()
        optimiser.step()
    assert listwise().item() < before / 2


def test_the_negative_bank_keeps_the_last_rows_and_offers_them_as_hard_negatives(data: Path, tmp_path: Path) -> None:
    bank = NegativeBank(5)
    for start in (0, 2, 4):  # rows 0..5 in batches of 2: the oldest one is overwritten
        bank.add({"x": np.arange(start, start + 2)[:, None]}, torch.eye(8)[start : start + 2], torch.arange(start, start + 2))
    assert bank.size == 5 and sorted(bank.keys.tolist()) == [1, 2, 3, 4, 5]
    assert all(bank.sides["x"][slot, 0] == key and bank.vectors[slot, key] == 1 for slot, key in enumerate(bank.keys.tolist()))

    with pytest.raises(ConfigError, match="negative_bank 8 would never be read"):
        setup(data, tmp_path, [*DUAL, "retrieval.dual_encoder.negative_bank=8", "retrieval.dual_encoder.distill_weight=0"])
    torch.manual_seed(0)
    _, task, model, rows, _ = setup(data, tmp_path, [*DUAL, "retrieval.dual_encoder.negative_bank=8",
                                                     "retrieval.dual_encoder.cross_rank_weight=1", "retrieval.dual_encoder.hard_negatives=8"])
    rng = np.random.default_rng(0)
    pool = NegativePool(64, rng)
    pool.add(rows)
    first, second = ({k: torch.as_tensor(v) for k, v in task.make_batch(part, rng, pool).items()} for part in (rows[:6], rows[6:12]))
    model.train()
    task.loss(model, first).backward()  # the first step fills the bank with rows 0..5
    assert task.dual.bank.size == 6
    text = {k: second[f"text_side.{k}"] for k in ("input_ids", "attention_mask")}
    image = {k: second[f"image_side.{k}"] for k in ("input_ids", "attention_mask", "token_type_ids", "img_feats")}
    mined = task.dual._candidates(model, text, image, second["dual_image_key"])
    assert mined.index.shape == (6, 9) and mined.bank_vectors.shape[0] == 6
    from_bank = mined.index[:, 1:][mined.valid[:, 1:]]
    assert (from_bank >= 6).any()  # the bank's rows compete with the batch's as negatives
    for j in from_bank[from_bank >= 6].tolist():
        want = task.dual.tz.image_side(rows[j - 6].od_labels, rows[j - 6].features)
        assert all(np.array_equal(mined.side(j)[k], want[k]) for k in want)
    for i, row in enumerate(mined.index.tolist()):  # never a picture of the caption itself
        picture = second["dual_image_key"][i]
        keys = torch.cat([second["dual_image_key"], task.dual.bank.keys[:6]])
        assert all(keys[j] != picture for j, ok in zip(row[1:], mined.valid[i, 1:].tolist()) if ok)
    loss = task.loss(model, second)
    loss.backward()
    assert torch.isfinite(loss) and task.dual.bank.size == 8


def test_heads_travel_in_the_model_dir_and_dirs_without_them_still_load(data: Path, tmp_path: Path) -> None:
    _, task, model, rows, _ = setup(data, tmp_path)
    out = model.save_pretrained(tmp_path / "dual")
    config = json.loads((out / "config.json").read_text())
    assert config["dual_encoder_dim"] == 32 and config["dual_encoder_temperature"] == 0.05
    assert {"dual.text_proj.weight", "dual.image_proj.bias"} <= load_file(str(out / "model.safetensors")).keys()
    embedder = DualEmbedder(out, batch_size=4)
    texts = embedder.embed_texts([r.texts[0] for r in rows[:3]])
    assert texts.shape == (3, 32) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    _, plain_task, plain, _, _ = setup(data, tmp_path / "plain", [])  # the same card without the section
    plain_dir = plain.save_pretrained(tmp_path / "plain_dir")
    assert "dual_encoder_dim" in json.loads((plain_dir / "config.json").read_text())
    loaded = OscarForRetrieval.from_pretrained(plain_dir)
    assert not loaded.has_dual_encoder and loaded.load_report.missing == []
    with pytest.raises(ValueError, match="no dual encoder"):
        DualEmbedder(plain_dir)
    # a dir with heads loads into a model without them (ignored), and vice versa (fresh heads)
    assert OscarForRetrieval.from_pretrained(out, dual_encoder_dim=0).load_report.unexpected
    assert OscarForRetrieval.from_pretrained(plain_dir, dual_encoder_dim=16).has_dual_encoder


def _trunk_grads(task, model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    task.loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("bert.") and p.grad is not None}


def test_a_separate_tower_starts_as_the_trunk_and_keeps_the_dual_losses_off_the_cross_encoder(data: Path, tmp_path: Path) -> None:
    separate = DUAL + ["retrieval.dual_encoder.tower=separate"]
    card, task, model, rows, _ = setup(data, tmp_path, separate)
    assert model.config.dual_encoder_tower == "separate"
    assert all(torch.equal(v, model.bert.state_dict()[k]) for k, v in model.dual_bert.state_dict().items())
    rng = np.random.default_rng(0)
    pool = NegativePool(64, rng)
    pool.add(rows)
    batch = {k: torch.as_tensor(v) for k, v in task.make_batch(rows[:6], rng, pool).items()}
    model.eval()  # no dropout: the two backward passes see the same forward
    with_dual = _trunk_grads(task, model, batch)
    assert model.get_parameter("dual_bert.encoder.layer.0.attention.self.query.weight").grad.abs().sum() > 0
    cross_only = {k: v for k, v in batch.items() if not k.startswith(("text_side.", "image_side.")) and k != "dual_image_key"}
    model.zero_grad(set_to_none=True)
    model(**cross_only).loss.backward()
    assert with_dual.keys() and all(torch.equal(with_dual[n], model.get_parameter(n).grad) for n in with_dual)
    # the shared tower sends the dual losses into the same trunk: its gradients differ from the cross loss alone
    _, shared_task, shared, _, _ = setup(data, tmp_path / "shared", DUAL)
    assert shared.dual_bert is None
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dual_bert.")})
    shared.eval()
    shared_grads = _trunk_grads(shared_task, shared, batch)
    assert any(not torch.equal(shared_grads[n], model.get_parameter(n).grad) for n in shared_grads)
    # the tower travels in the model dir; embeddings come from it
    out = model.save_pretrained(tmp_path / "separate_dir")
    assert json.loads((out / "config.json").read_text())["dual_encoder_tower"] == "separate"
    with torch.no_grad():
        model.dual_bert.pooler.dense.weight.zero_()  # not used by the sides (masked mean), so embeddings stay
        model.dual_bert.embeddings.word_embeddings.weight.mul_(2)
    saved = model.save_pretrained(tmp_path / "moved")
    loaded = OscarForRetrieval.from_pretrained(saved)
    assert torch.equal(loaded.dual_bert.embeddings.word_embeddings.weight, model.dual_bert.embeddings.word_embeddings.weight)
    assert not torch.equal(loaded.dual_bert.embeddings.word_embeddings.weight, loaded.bert.embeddings.word_embeddings.weight)
    texts = [r.texts[0] for r in rows[:3]]
    assert not np.allclose(DualEmbedder(saved, batch_size=4).embed_texts(texts), DualEmbedder(out, batch_size=4).embed_texts(texts))


def test_an_embedding_does_not_depend_on_its_batch(data: Path, tmp_path: Path) -> None:
    _, task, model, rows, val = setup(data, tmp_path)
    model.eval()
    sides = [task.dual.tz.image_side(r.od_labels, r.features) for r in val]
    together = embed_sides(model, sides, "image", 3)
    alone = np.concatenate([embed_sides(model, [s], "image", 3) for s in sides])
    assert np.array_equal(together, alone)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(100 + rank)
        text = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1).requires_grad_()
        image = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1).requires_grad_()
        keys = torch.arange(3) + 10 * rank
        gathered = gather_with_grad(text)
        (gathered * torch.arange(1.0, 7.0)[:, None]).sum().backward()
        loss = contrastive_loss(text.detach(), image.detach(), keys, 0.1)
        torch.save({"gathered": gathered.detach(), "grad": text.grad, "text": text.detach(), "image": image.detach(),
                    "loss": loss}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_hands_every_workers_negatives_to_the_loss(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    everything = torch.cat([r["text"] for r in ranks])
    weights = torch.arange(1.0, 7.0)[:, None].expand(6, 8)
    for rank, got in enumerate(ranks):
        assert torch.equal(got["gathered"], everything)  # rank order, both workers' rows
        assert torch.equal(got["grad"], weights[3 * rank : 3 * rank + 3])  # gradient reaches the local part only
    # each worker's loss equals the loss of its pairs against the concatenated batch, computed in one process
    all_image = torch.cat([r["image"] for r in ranks])
    all_keys = torch.cat([torch.arange(3) + 10 * r for r in range(2)])
    for rank, got in enumerate(ranks):
        local = slice(3 * rank, 3 * rank + 3)
        t2i = _nce(everything[local], all_image, all_keys[local, None] == all_keys[None, :])
        i2t = _nce(all_image[local], everything, all_keys[local, None] == all_keys[None, :])
        assert float(got["loss"]) == pytest.approx(float((t2i + i2t) / 2), rel=1e-5)
        alone = contrastive_loss(got["text"], got["image"], all_keys[local], 0.1)  # only local negatives
        assert float(alone) != pytest.approx(float(got["loss"]), rel=1e-3)


def _nce(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    logits = queries @ keys.T / 0.1
    return -(logits[positive].view(len(queries)) - torch.logsumexp(logits, dim=1)).mean()
