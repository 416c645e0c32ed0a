"""The three Oscar task models on top of OscarModel (microsoft/Oscar `oscar/modeling/modeling_bert.py`).

All take the original tensor names as keyword arguments (`input_ids, attention_mask, token_type_ids,
img_feats`, plus the task's labels) and return a `TaskOutput` with `.loss` (when labels are given) and `.logits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mengzi_ray.modeling.bert import HeadTransform
from mengzi_ray.modeling.checkpoint import LoadReport, OscarPreTrainedModel
from mengzi_ray.modeling.config import OscarConfig
from mengzi_ray.modeling.dual_encoder import DualEncoderHeads, masked_mean
from mengzi_ray.modeling.generation import GenerationOutput, SpecialIds, generate
from mengzi_ray.modeling.oscar import OscarModel


@dataclass
class TaskOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None  # pretraining: (B, num_contrast_classes)
    mlm_loss: torch.Tensor | None = None  # pretraining
    num_correct: torch.Tensor | None = None  # captioning, pretraining: argmax hits over the masked tokens
    text_embeds: torch.Tensor | None = None  # retrieval with a dual encoder: (B, dim) unit vectors
    image_embeds: torch.Tensor | None = None


class OscarLMHead(nn.Module):
    """Oscar's MLM head: transform (dense, gelu, LN) → decoder (no bias) + a separate output bias.

    Keys: predictions.transform.{dense,LayerNorm}.*, predictions.decoder.weight, predictions.bias.
    """

    def __init__(self, config: OscarConfig):
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = HeadTransform(config.hidden_size, config.hidden_act, config.layer_norm_eps)
        self.predictions.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        p = self.predictions
        return p.decoder(p.transform(hidden)) + p.bias


class OscarForPretraining(OscarPreTrainedModel):
    """MLM over the sequence + image-text contrastive head (2- or 3-way) on the pooled output.

    A 2-way head in the file loads into a 3-way model by starting the head fresh, as the original tolerates.
    """

    tolerated_missing = (r"cls\.seq_relationship\.",)
    tolerated_unexpected = (r"classifier\.",)

    def __init__(self, config: OscarConfig):
        super().__init__(config)
        self.bert = OscarModel(config)
        self.cls = OscarLMHead(config)
        self.cls.seq_relationship = nn.Linear(config.hidden_size, config.num_contrast_classes)
        self.init_weights()

    def tie_weights(self) -> None:  # the pretraining decoder is always tied to the word embeddings
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        img_feats: torch.Tensor | None = None,
        masked_lm_labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> TaskOutput:
        """masked_lm_labels: (B, T) or (B, T+R), −1 = not a target. Without labels, logits (B, T+R, V) over every
        position, as the original computes them. With labels, the vocab projection runs only at the N targets
        (row-major): logits (N, V), num_correct their argmax hits, loss CE(MLM) + CE(contrastive), equal to the
        original's loss over every position with ignore_index −1 (the projection is ~1/6 of a base step's FLOPs
        at 35 + 50 positions, and only ~5 of those positions are targets)."""
        out = self.bert(input_ids, attention_mask, token_type_ids, img_feats, position_ids)
        relation = self.cls.seq_relationship(out.pooler_output)
        if masked_lm_labels is None or next_sentence_label is None:
            return TaskOutput(logits=self.cls(out.last_hidden_state), seq_relationship_logits=relation)
        hidden = out.last_hidden_state[:, : masked_lm_labels.shape[1]].reshape(-1, out.last_hidden_state.shape[-1])
        flat = masked_lm_labels.reshape(-1)
        targets = (flat != -1).nonzero().squeeze(1)  # one data-dependent shape: one graph break under torch.compile
        labels = flat.index_select(0, targets)
        scores = self.cls(hidden.index_select(0, targets))
        mlm = F.cross_entropy(scores.float(), labels)  # NaN for a batch without targets, as the original's
        contrast = F.cross_entropy(relation.float(), next_sentence_label.reshape(-1))
        return TaskOutput(logits=scores, loss=mlm + contrast, seq_relationship_logits=relation, mlm_loss=mlm,
                          num_correct=(scores.argmax(-1) == labels).sum())


class CaptioningLoss(nn.Module):
    """Label-smoothed KL to the target + "drop worst": after `drop_worst_after` calls keep the smallest losses.

    `calls` counts forward calls per process, as the original does; it is training state (checkpoint it).
    """

    def __init__(self, label_smoothing: float, drop_worst_ratio: float, drop_worst_after: int):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after
        self.calls = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, V), target (N,) → scalar loss."""
        eps = self.label_smoothing
        vocab = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        q = torch.full_like(log_probs, eps / (vocab - 1))
        q.scatter_(1, target[:, None], 1.0 - eps)
        # KL(q || p) = Σ q (log q − log p); 0·log 0 taken as 0 so eps = 0 is plain cross-entropy.
        per_token = (torch.xlogy(q, q) - q * log_probs).sum(dim=1)
        self.calls += 1
        if self.drop_worst_ratio > 0 and self.calls > self.drop_worst_after:
            keep = int(per_token.shape[0] * (1 - self.drop_worst_ratio))
            per_token, _ = torch.topk(per_token, k=keep, largest=False)
        return per_token.mean()


class OscarForCaptioning(OscarPreTrainedModel):
    """Seq2seq by masking: the caption sees itself causally, tags and regions; masked caption tokens are predicted.

    Training (masked_ids given): logits (num_masked, V) for the masked positions in row-major order, loss by
    CaptioningLoss. Inference: logits (B, T, V) for every text position. `generate` decodes (see generation.py).
    """

    tolerated_unexpected = (r"cls\.seq_relationship\.",)

    def __init__(self, config: OscarConfig):
        super().__init__(config)
        self.bert = OscarModel(config)
        self.cls = OscarLMHead(config)
        self.loss = CaptioningLoss(config.label_smoothing, config.drop_worst_ratio, config.drop_worst_after)
        self.init_weights()

    def tie_weights(self) -> None:
        embedding = self.bert.embeddings.word_embeddings.weight
        if self.config.tie_weights:
            self.cls.predictions.decoder.weight = embedding
        embedding.requires_grad_(not self.config.freeze_embedding)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        img_feats: torch.Tensor | None = None,
        masked_pos: torch.Tensor | None = None,
        masked_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        is_training: bool | None = None,
    ) -> TaskOutput:
        training = masked_ids is not None if is_training is None else is_training
        if not training:
            out = self.bert(input_ids, attention_mask, token_type_ids, img_feats, position_ids)
            return TaskOutput(logits=self.cls(out.last_hidden_state[:, : input_ids.shape[1]]))
        if masked_pos is None or masked_ids is None:
            raise ValueError("captioning training needs masked_pos (B, T) and masked_ids (B, max_masked)")
        # Only the masked positions are read: the trunk skips padding and the last layer's other rows.
        selected = self.bert.forward_read_out(input_ids, attention_mask, masked_pos, token_type_ids, img_feats, position_ids)
        target = masked_ids[masked_ids != 0]
        if selected.shape[0] != target.shape[0]:
            raise ValueError(f"{selected.shape[0]} masked positions but {target.shape[0]} non-pad masked_ids")
        logits = self.cls(selected).float()
        loss = self.loss(logits, target)
        return TaskOutput(logits=logits, loss=loss, num_correct=(logits.argmax(-1) == target).sum())

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        img_feats: torch.Tensor,
        masked_pos: torch.Tensor | None = None,
        *,
        num_beams: int = 1,
        max_length: int = 20,
        length_penalty: float = 1.0,
        num_keep_best: int = 1,
        od_labels_start_posid: int | None = None,
        use_cache: bool = True,
        special_ids: SpecialIds | None = None,
    ) -> GenerationOutput:
        """Greedy (num_beams 1) or beam search on the test layout; see generation.py for the contract.

        masked_pos is accepted for the original call signature and unused (every caption slot is a [MASK]).
        od_labels_start_posid defaults to the training caption budget (config.max_seq_a_length); special ids
        default to the model dir's vocab.txt.
        """
        del masked_pos
        return generate(
            self.bert,
            self.cls,
            special_ids or self.special_ids(),
            input_ids,
            attention_mask,
            token_type_ids,
            img_feats,
            max_length=max_length,
            num_beams=num_beams,
            length_penalty=length_penalty,
            num_keep_best=num_keep_best,
            od_labels_start_posid=(
                self.config.max_seq_a_length if od_labels_start_posid is None else od_labels_start_posid
            ),
            use_cache=use_cache,
        )


class OscarForRetrieval(OscarPreTrainedModel):
    """Image-text match classifier on the pooled output; match score = softmax(logits)[:, 1].

    With `config.dual_encoder_dim` > 0 it also carries the dual-encoder heads (`self.dual`, modeling/dual_encoder.py):
    `embed_texts` / `embed_images` give unit vectors whose inner product ranks a gallery without the cross-encoder.
    The heads read the cross-encoder's own trunk (`dual_encoder_tower` "shared") or a trunk of their own
    (`dual_bert`, "separate": twice the weights, and the dual-encoder losses never move the cross-encoder's trunk).
    A checkpoint without heads loads into a model with them (they start fresh: training adds them; a separate tower
    the checkpoint lacks starts as a copy of the loaded trunk), and one with heads into a model without them (they
    are ignored).
    """

    tolerated_missing = (r"classifier\.", r"dual\.", r"dual_bert\.")
    tolerated_unexpected = (r"cls\.", r"dual\.", r"dual_bert\.")

    def __init__(self, config: OscarConfig):
        super().__init__(config)
        self.bert = OscarModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.dual = DualEncoderHeads(config.hidden_size, config.dual_encoder_dim) if config.dual_encoder_dim else None
        separate = bool(config.dual_encoder_dim) and config.dual_encoder_tower == "separate"
        self.dual_bert = OscarModel(config) if separate else None
        self.init_weights()
        if self.dual_bert is not None:
            self.dual_bert.load_state_dict(self.bert.state_dict())

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], file: str, **kwargs: Any) -> LoadReport:
        """As the base class; a separate tower the checkpoint does not carry starts from the loaded trunk."""
        report = super().load_checkpoint_state(state, file, **kwargs)
        if self.dual_bert is not None and any(k.startswith("dual_bert.") for k in report.missing):
            self.dual_bert.load_state_dict(self.bert.state_dict())
        return report

    def _tower(self) -> OscarModel:
        return self.bert if self.dual_bert is None else self.dual_bert

    @property
    def has_dual_encoder(self) -> bool:
        return self.dual is not None

    def _heads(self) -> DualEncoderHeads:
        if self.dual is None:
            raise ValueError("this retrieval model has no dual encoder (config dual_encoder_dim is 0)")
        return self.dual

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text side: [CLS] caption [SEP] ids (B, T), 0/1 mask (B, T) → (B, dim) unit vectors (float32)."""
        heads = self._heads()
        hidden = self._tower()(input_ids, attention_mask, torch.zeros_like(input_ids)).last_hidden_state
        return heads.project_text(masked_mean(hidden, attention_mask))

    def embed_images(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor, img_feats: torch.Tensor
    ) -> torch.Tensor:
        """Image side: [CLS] tags [SEP] ids (B, T), segments (B, T), regions (B, R, D), 0/1 mask (B, T + R) →
        (B, dim) unit vectors (float32)."""
        heads = self._heads()
        hidden = self._tower()(input_ids, attention_mask, token_type_ids, img_feats).last_hidden_state
        return heads.project_image(masked_mean(hidden, attention_mask))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        img_feats: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        text_side: dict[str, torch.Tensor] | None = None,
        image_side: dict[str, torch.Tensor] | None = None,
    ) -> TaskOutput:
        """Cross-encoder logits (and loss with labels); with `text_side` / `image_side` (the inputs of
        `embed_texts` / `embed_images`) also their embeddings, in the same call, so that one DDP forward covers
        every use of the trunk in a training step."""
        out = self.bert(input_ids, attention_mask, token_type_ids, img_feats, position_ids)
        logits = self.classifier(self.dropout(out.pooler_output))
        text_embeds = self.embed_texts(**text_side) if text_side is not None else None
        image_embeds = self.embed_images(**image_side) if image_side is not None else None
        if labels is None:
            return TaskOutput(logits=logits, text_embeds=text_embeds, image_embeds=image_embeds)
        return TaskOutput(logits=logits, loss=self.match_loss(logits, labels), text_embeds=text_embeds,
                          image_embeds=image_embeds)

    def match_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The original's classifier loss of logits (B, num_labels) against 0/1 labels (B,): MSE with one label,
        else BCE (`loss_type` bce) or CE; a scalar."""
        if self.config.num_labels == 1:
            return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
        if self.config.loss_type == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * self.config.num_labels
        return F.cross_entropy(logits.float(), labels.view(-1))

    @staticmethod
    def match_score(logits: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits → (B,) probability that text and image match."""
        return logits.float().softmax(dim=-1)[:, 1]
