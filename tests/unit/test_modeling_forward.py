"""OscarModel and heads against a reference written from the spec (microsoft/Oscar `oscar/modeling/modeling_bert.py`)
with plain torch ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mengzi_ray.modeling import OscarForCaptioning, OscarForPretraining, OscarForRetrieval, OscarModel
from mengzi_ray.modeling.heads import CaptioningLoss
from tests.conftest import tiny_config


def reference_trunk(sd: dict[str, torch.Tensor], cfg, input_ids, mask, token_type_ids, img_feats, position_ids=None):
    """The original BertImgModel, eager, from the spec: -10000 additive mask, post-LN layers, erf gelu."""
    p = lambda k: sd[f"bert.{k}"]  # noqa: E731
    T = input_ids.shape[1]
    pos = torch.arange(T)[None] if position_ids is None else position_ids
    x = p("embeddings.word_embeddings.weight")[input_ids] + p("embeddings.position_embeddings.weight")[pos]
    x = x + p("embeddings.token_type_embeddings.weight")[token_type_ids]
    x = F.layer_norm(x, (cfg.hidden_size,), p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), cfg.layer_norm_eps)
    r = img_feats @ p("img_embedding.weight").T + p("img_embedding.bias")
    if cfg.use_img_layernorm:
        r = F.layer_norm(r, (cfg.hidden_size,), p("LayerNorm.weight"), p("LayerNorm.bias"), cfg.img_layer_norm_eps)
    h = torch.cat([x, r], dim=1)
    ext = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
    ext = (1.0 - ext.float()) * -10000.0
    B, N, H = h.shape
    nh, d = cfg.num_attention_heads, H // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        w = lambda k: p(f"encoder.layer.{i}.{k}")  # noqa: E731
        lin = lambda t, k: t @ w(f"{k}.weight").T + w(f"{k}.bias")  # noqa: E731
        split = lambda t: t.view(B, N, nh, d).transpose(1, 2)  # noqa: E731
        q, k, v = (split(lin(h, f"attention.self.{n}")) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + ext, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(B, N, H)
        h = F.layer_norm(lin(ctx, "attention.output.dense") + h, (H,), w("attention.output.LayerNorm.weight"), w("attention.output.LayerNorm.bias"), cfg.layer_norm_eps)
        inter = lin(h, "intermediate.dense")
        inter = inter * 0.5 * (1.0 + torch.erf(inter / math.sqrt(2.0)))
        h = F.layer_norm(lin(inter, "output.dense") + h, (H,), w("output.LayerNorm.weight"), w("output.LayerNorm.bias"), cfg.layer_norm_eps)
    pooled = torch.tanh(h[:, 0] @ p("pooler.dense.weight").T + p("pooler.dense.bias"))
    return h, pooled


def reference_mlm(sd, cfg, h):
    t = h @ sd["cls.predictions.transform.dense.weight"].T + sd["cls.predictions.transform.dense.bias"]
    t = t * 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))
    t = F.layer_norm(t, (cfg.hidden_size,), sd["cls.predictions.transform.LayerNorm.weight"], sd["cls.predictions.transform.LayerNorm.bias"], cfg.layer_norm_eps)
    return t @ sd["cls.predictions.decoder.weight"].T + sd["cls.predictions.bias"]


def batch(cfg, B=3, T=7, R=4, three_d=False):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    token_type_ids = torch.randint(0, 2, (B, T), generator=g)
    img = torch.randn(B, R, cfg.img_feature_dim, generator=g)
    if three_d:
        mask = (torch.rand(B, T + R, T + R, generator=g) > 0.3).long()
        mask[:, :, 0] = 1
        mask[:, -1, :] = 0  # a fully masked row: the original's -10000 bias keeps it finite (uniform attention)
    else:
        mask = torch.ones(B, T + R, dtype=torch.long)
        mask[0, T - 2 : T] = 0
        mask[1, -2:] = 0
    return dict(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids, img_feats=img)


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("img_ln", [False, True])
def test_trunk_matches_reference(three_d: bool, img_ln: bool) -> None:
    cfg = tiny_config(use_img_layernorm=img_ln)
    model = OscarForRetrieval(cfg).eval()
    inputs = batch(cfg, three_d=three_d)
    out = model.bert(**inputs)
    ref_h, ref_pooled = reference_trunk(model.state_dict(), cfg, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], inputs["img_feats"])
    assert out.last_hidden_state.shape == (3, 7 + 4, cfg.hidden_size)
    torch.testing.assert_close(out.last_hidden_state, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref_pooled, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.last_hidden_state).all()


def test_regions_get_no_position_or_segment_embedding() -> None:
    cfg = tiny_config()
    model = OscarModel(cfg).eval()
    img = torch.randn(1, 2, cfg.img_feature_dim)
    mask = torch.ones(1, 3 + 2)
    a = model(torch.tensor([[2, 5, 3]]), mask, torch.tensor([[0, 0, 0]]), img)
    b = model(torch.tensor([[2, 5, 3]]), mask, torch.tensor([[0, 0, 0]]), img.flip(1))
    # Swapping the two regions only swaps their outputs: regions carry no position.
    torch.testing.assert_close(a.last_hidden_state[:, 3:], b.last_hidden_state[:, 3:].flip(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.last_hidden_state[:, :3], b.last_hidden_state[:, :3], atol=1e-5, rtol=1e-5)


def test_pretraining_outputs_and_loss() -> None:
    cfg = tiny_config(num_contrast_classes=3)
    model = OscarForPretraining(cfg).eval()
    inputs = batch(cfg)
    labels = torch.full((3, 7), -1)
    labels[0, 1], labels[2, 3] = 5, 9
    nsp = torch.tensor([0, 2, 1])
    out = model(**inputs, masked_lm_labels=labels, next_sentence_label=nsp)
    sd = model.state_dict()
    h, pooled = reference_trunk(sd, cfg, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], inputs["img_feats"])
    scores = reference_mlm(sd, cfg, h)
    full = model(**inputs)
    assert full.logits.shape == (3, 11, cfg.vocab_size)  # without labels: over all T+R positions, as the original
    torch.testing.assert_close(full.logits, scores, atol=1e-5, rtol=1e-5)
    # with labels: the vocab projection only at the targets, row-major; the loss the original's over every position
    torch.testing.assert_close(out.logits, scores[:, :7][labels != -1], atol=1e-5, rtol=1e-5)
    assert int(out.num_correct) == int((scores[:, :7][labels != -1].argmax(-1) == labels[labels != -1]).sum())
    rel = pooled @ sd["cls.seq_relationship.weight"].T + sd["cls.seq_relationship.bias"]
    expected = F.cross_entropy(scores[:, :7].reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-1) + F.cross_entropy(rel, nsp)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    padded = torch.cat([labels, torch.full((3, 4), -1)], dim=1)  # (B, T+R) labels give the same loss
    torch.testing.assert_close(model(**inputs, masked_lm_labels=padded, next_sentence_label=nsp).loss, out.loss)
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")
    for targets in (labels, padded, torch.where(torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) < 0.5, 4, -1)):
        torch.testing.assert_close(compiled(**inputs, masked_lm_labels=targets, next_sentence_label=nsp).loss,
                                   model(**inputs, masked_lm_labels=targets, next_sentence_label=nsp).loss)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_captioning_training_and_eval_forward() -> None:
    cfg = tiny_config(tie_weights=True, freeze_embedding=True)
    model = OscarForCaptioning(cfg).eval()
    inputs = batch(cfg, three_d=True)
    masked_pos = torch.zeros(3, 7, dtype=torch.long)
    masked_pos[0, [1, 3]] = 1
    masked_pos[2, 2] = 1
    masked_ids = torch.tensor([[6, 7, 0], [0, 0, 0], [8, 0, 0]])
    out = model(**inputs, masked_pos=masked_pos, masked_ids=masked_ids)
    sd = model.state_dict()
    h, _ = reference_trunk(sd, cfg, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], inputs["img_feats"])
    rows = torch.stack([h[0, 1], h[0, 3], h[2, 2]])
    expected_logits = reference_mlm(sd, cfg, rows)
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected_logits, torch.tensor([6, 7, 8])), atol=1e-5, rtol=1e-5)
    full = model(**inputs)  # no masked_ids: inference logits over every text position
    torch.testing.assert_close(full.logits, reference_mlm(sd, cfg, h[:, :7]), atol=1e-5, rtol=1e-5)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


def test_retrieval_logits_loss_and_score() -> None:
    cfg = tiny_config()
    model = OscarForRetrieval(cfg).eval()
    inputs = batch(cfg)
    out = model(**inputs, labels=torch.tensor([1, 0, 1]))
    sd = model.state_dict()
    _, pooled = reference_trunk(sd, cfg, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], inputs["img_feats"])
    logits = pooled @ sd["classifier.weight"].T + sd["classifier.bias"]
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.tensor([1, 0, 1])), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(OscarForRetrieval.match_score(out.logits), logits.softmax(-1)[:, 1])


def test_label_smoothing_loss_by_hand() -> None:
    # V = 4, eps = 0.3: q = [0.7, 0.1, 0.1, 0.1] for target 0; uniform logits → log p = log 1/4 everywhere.
    loss = CaptioningLoss(label_smoothing=0.3, drop_worst_ratio=0.0, drop_worst_after=0)
    value = loss(torch.zeros(1, 4), torch.tensor([0]))
    expected = 0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1) - math.log(0.25)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_drop_worst_starts_after_the_configured_calls() -> None:
    loss = CaptioningLoss(label_smoothing=0.0, drop_worst_ratio=0.5, drop_worst_after=1)
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([0, 0, 0, 0])
    per_token = F.cross_entropy(logits, target, reduction="none")
    first = loss(logits, target)  # call 1: not after 1 → mean of all
    second = loss(logits, target)  # call 2: keep the int(4 * 0.5) = 2 smallest
    assert first.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    assert second.item() == pytest.approx(per_token.sort().values[:2].mean().item(), abs=1e-6)
    assert loss.calls == 2


def test_wrong_feature_dim_and_bad_mask_are_named() -> None:
    cfg = tiny_config()
    model = OscarModel(cfg)
    with pytest.raises(ValueError, match=r"img_feats must be \(B, R, 12\)"):
        model(torch.tensor([[2, 3]]), torch.ones(1, 4), None, torch.randn(1, 2, 2054))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[2, 3]]), torch.ones(1, 3), None, torch.randn(1, 2, 12))
