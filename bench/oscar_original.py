"""The original Oscar captioning training step, re-stated on the weights of one of our OscarForCaptioning models:
the baseline of bench_train_step.

What it re-states (microsoft/Oscar, oscar/modeling/modeling_bert.py, and the pytorch_transformers release its
`transformers` submodule pins, whose BertLayer / gelu / AdamW it imports):
  - BertImgModel.forward: additive mask (1 - mask) * -10000, text embeddings, region Linear + LayerNorm + dropout,
    concatenation, every layer on every position, then the pooler;
  - CaptionBertSelfAttention: eager attention (matmul, / sqrt(d), + mask, softmax, dropout, matmul);
  - BertIntermediate / BertPredictionHeadTransform with pytorch_transformers' `gelu`
    (x * 0.5 * (1 + erf(x / sqrt(2))) in separate tensor ops); BertSelfOutput / BertOutput as in BERT;
  - BertForImageCaptioning.encode_forward: logits only at masked positions;
  - BertCaptioningLoss: a dense smoothed one-hot, LogSoftmax, KLDivLoss(reduction="none").sum(1), mean;
  - run_captioning.train: clip_grad_norm_, then pytorch_transformers' AdamW (a Python loop over parameters,
    bias-corrected step size, decoupled weight decay after the update).
The original cannot be imported beside the project (it needs the 2019 pytorch_transformers tree), so the bench
runs this re-statement; `check_same_loss` proves it computes our loss on the same weights and batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mengzi_ray.modeling import OscarForCaptioning
from mengzi_ray.training.optim import CAPTION_NO_DECAY


def original_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class OriginalCaptioningStep:
    """One optimiser step of the original on `model`'s parameters (the model is only a weight container here)."""

    def __init__(self, model: OscarForCaptioning, lr: float, weight_decay: float, max_grad_norm: float):
        self.model = model
        self.lr, self.max_grad_norm = lr, max_grad_norm
        decay, plain = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (plain if any(nd in name for nd in CAPTION_NO_DECAY) else decay).append(param)
        self.groups = [(decay, weight_decay), (plain, 0.0)]
        self.state: dict[nn.Parameter, dict[str, Any]] = {}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """BertForImageCaptioning.encode_forward + BertCaptioningLoss (label smoothing, drop-worst counter)."""
        m = self.model
        bert, cfg = m.bert, m.config
        mask = batch["attention_mask"]
        extended = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]).to(torch.float32)
        extended = (1.0 - extended) * -10000.0
        text = bert.embeddings(batch["input_ids"], batch["token_type_ids"], None)  # positions 0..T-1
        regions = bert.img_embedding(batch["img_feats"])
        if bert.LayerNorm is not None:
            regions = bert.LayerNorm(regions)
        hidden = torch.cat([text, bert.img_dropout(regions)], dim=1)
        heads = cfg.num_attention_heads
        for layer in bert.encoder.layer:
            hidden = self._layer(layer, hidden, extended, heads, cfg.attention_probs_dropout_prob)
        bert.pooler(hidden)  # computed and unused by the captioning loss, as the original does
        sequence = hidden[:, : batch["masked_pos"].shape[-1]][batch["masked_pos"] == 1]
        p = m.cls.predictions
        transformed = p.transform.LayerNorm(original_gelu(p.transform.dense(sequence)))
        logits = (p.decoder(transformed) + p.bias).float()
        target = batch["masked_ids"][batch["masked_ids"] != 0]
        return self._captioning_loss(logits, target)

    def _layer(self, layer: nn.Module, hidden: torch.Tensor, extended: torch.Tensor, heads: int, attn_dropout: float) -> torch.Tensor:
        attn = layer.attention.self
        b, n, h = hidden.shape

        def for_scores(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, heads, h // heads).permute(0, 2, 1, 3)

        q, k, v = for_scores(attn.query(hidden)), for_scores(attn.key(hidden)), for_scores(attn.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(h // heads) + extended
        probs = F.dropout(nn.Softmax(dim=-1)(scores), attn_dropout, self.model.training)
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous().view(b, n, h)
        attention_output = layer.attention.output(context, hidden)
        intermediate = original_gelu(layer.intermediate.dense(attention_output))
        return layer.output(intermediate, attention_output)

    def _captioning_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spec = self.model.loss
        spec.calls += 1
        eps, n_class = spec.label_smoothing, logits.size(1)
        one_hot = torch.zeros_like(logits).scatter(1, target.view(-1, 1), 1)
        one_hot = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_class - 1)
        loss = nn.KLDivLoss(reduction="none")(nn.LogSoftmax(dim=1)(logits), one_hot).sum(1)
        if spec.drop_worst_ratio > 0 and spec.calls > spec.drop_worst_after:
            loss, _ = torch.topk(loss, k=int(loss.shape[0] * (1 - spec.drop_worst_ratio)), largest=False)
        return loss.mean()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """run_captioning's inner loop: forward, backward, clip, AdamW step, zero_grad. Returns the loss."""
        loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self._adamw()
        self.model.zero_grad()
        return loss.item()

    @torch.no_grad()
    def _adamw(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        beta1, beta2 = betas
        for params, weight_decay in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(eps)
                step_size = self.lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if weight_decay > 0.0:
                    p.add_(p, alpha=-self.lr * weight_decay)


def check_same_loss(ours: OscarForCaptioning, original: OriginalCaptioningStep, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Both losses on the same batch with dropout off and the drop-worst counters restored: they must agree."""
    ours_mode, calls = ours.training, (ours.loss.calls, original.model.loss.calls)
    ours.eval()
    original.model.eval()
    with torch.no_grad():
        a = float(ours(**batch).loss)
        b = float(original.loss(batch))
    ours.train(ours_mode)
    original.model.train(ours_mode)
    ours.loss.calls, original.model.loss.calls = calls
    return {"ours": a, "original": b, "abs_diff": abs(a - b)}
