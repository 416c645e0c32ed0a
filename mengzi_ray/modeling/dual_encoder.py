"""The dual-encoder first stage of retrieval: two pooled projection heads on the retrieval model's Oscar trunk.

The cross-encoder (`OscarForRetrieval`) reads caption ‖ tags ‖ regions together, so a gallery search costs one
trunk pass per image. The dual encoder runs a trunk (the cross-encoder's own, or a copy of its own: the
`dual_encoder_tower` setting) once per side:

* image side: [CLS] tags [SEP] (segment 1 for the tags) followed by the regions, no caption;
* text side: [CLS] caption [SEP], no tags, no regions;

and maps each side's masked mean of the last hidden states through its own Linear(hidden → dim), L2-normalised.
Gallery embeddings are computed once (the index job); a query costs one text-side pass plus a matrix product.

Training (the retrieval task with `retrieval.dual_encoder.enabled`): `contrastive_loss` is in-batch InfoNCE in
both directions over embeddings all-gathered across the Ray Train workers (`gather_with_grad`: every worker's
part as values, the local part with its gradient, as CLIP-style training does); `distill_loss` is the KL from the
cross-encoder's softmax over [the positive, the hardest negatives] to the dual encoder's (negatives from the
batch, and with a negative bank from the worker's recent rows too: training/dual_objective.py); `rank_loss` is the
cross-encoder's own listwise loss over the same pairs (card `cross_rank_weight`).

Heads keys in model.safetensors: `dual.text_proj.{weight,bias}`, `dual.image_proj.{weight,bias}`, and with a
separate tower its trunk under `dual_bert.*`; config.json records `dual_encoder_dim` (0 = no dual encoder),
`dual_encoder_temperature` and `dual_encoder_tower` (shared | separate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DualEncoderHeads(nn.Module):
    """Linear(hidden → dim) per side; `project_*` take pooled (B, hidden) and return unit vectors (B, dim)."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.text_proj = nn.Linear(hidden_size, dim)
        self.image_proj = nn.Linear(hidden_size, dim)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled).float(), dim=-1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, N, H) over the positions where mask (B, N) is 1; (B, H). A row with no position is 0."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) of every process in rank order; the local slice keeps its autograd history, the others
    are values. Without an initialised process group (or with one process) x itself. Every rank must pass the
    same shape (the training loop's micro-batches are drop_last, so they do)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _multi_positive_nce(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over queries of −log(Σ_positives e^{s} / Σ_all e^{s}), s = q·k / temperature. positive: (Q, K) bool,
    every row with at least one True (the query's own pair)."""
    logits = queries @ keys.T / temperature
    positives = logits.masked_fill(~positive, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positives, dim=1)).mean()


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, image_keys: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE of the local pairs (text[i], image[i]) against every worker's batch.

    text, image: (B, dim) unit vectors of this worker; image_keys: (B,) int64 naming each pair's image, so a
    text of an image that sits elsewhere in the gathered batch too counts that copy as a positive, not a negative.
    Returns (t2i + i2t) / 2, a scalar.
    """
    all_text, all_image, all_keys = gather_with_grad(text), gather_with_grad(image), gather_with_grad(image_keys)
    positive = image_keys[:, None] == all_keys[None, :]
    t2i = _multi_positive_nce(text, all_image, positive, temperature)
    i2t = _multi_positive_nce(image, all_text, positive, temperature)
    return (t2i + i2t) / 2


def hard_negatives(
    text: torch.Tensor, image: torch.Tensor, image_keys: torch.Tensor, count: int, text_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each text i, the `count` images of other pictures most similar to it: (indices (B, count) into image,
    valid (B, count) bool; False where image holds fewer other pictures than `count`).

    text: (B, dim); image: (M, dim) with image_keys (M,); text_keys (B,) name each text's picture (default:
    image_keys, i.e. text i belongs to image i)."""
    text_keys = image_keys if text_keys is None else text_keys
    sims = (text @ image.T).float()
    sims = sims.masked_fill(text_keys[:, None] == image_keys[None, :], float("-inf"))
    count = min(count, sims.shape[1])
    values, indices = sims.topk(count, dim=1)
    return indices, torch.isfinite(values)


def distill_loss(
    text: torch.Tensor, image: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor,
    teacher_logits: torch.Tensor, temperature: float, teacher_temperature: float,
) -> torch.Tensor:
    """KL(teacher ‖ student) over each text's candidate images [its own, then the hard negatives].

    text, image: (B, dim) local unit vectors; candidates: (B, C) image indices (column 0 the text's own image);
    valid: (B, C) bool; teacher_logits: (B, C) the cross-encoder's match log-odds of the same pairs (no gradient).
    Student logits are text·image / temperature; teacher probabilities softmax(teacher_logits / teacher_temperature).
    """
    student = (text[:, None, :] * image[candidates]).sum(-1) / temperature
    student = student.masked_fill(~valid, float("-inf"))
    teacher = (teacher_logits.float() / teacher_temperature).masked_fill(~valid, float("-inf"))
    p_teacher = teacher.softmax(dim=1)
    log_student = student.log_softmax(dim=1).masked_fill(~valid, 0.0)
    return (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_student).sum(dim=1).mean()


def match_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """The cross-encoder's (B, 2) logits → (B,) float32 log-odds of a match (monotone in its match score)."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


def rank_loss(log_odds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Listwise CE that puts each caption's own image (column 0) first: mean over rows of −log softmax(log_odds)[0]
    over the valid columns. log_odds, valid: (B, C)."""
    masked = log_odds.float().masked_fill(~valid, float("-inf"))
    return (torch.logsumexp(masked, dim=1) - masked[:, 0]).mean()
