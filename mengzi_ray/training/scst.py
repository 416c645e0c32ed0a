"""Self-critical sequence training for captioning (microsoft/Oscar `oscar/run_captioning.py` `scst_train_iter`), as a
task of the common train loop.

Per image (rows carry all reference captions of one image, in the test layout): an eval-mode greedy caption is
the baseline; `scst.sample_n` train-mode multinomial samples are scored with CIDEr-D against the references;
loss = mean over samples of −(reward − baseline) × (mean token log-prob of the sample). CIDEr-D document
frequencies come from the training references (every train image of the card's text file, character tokens, as
the validation metrics use), built once per worker on first use.

The samples are decoded through the model's submodules, not its forward, so DDP cannot see them: this task asks
the loop for an explicit gradient all-reduce instead of a DDP wrapper (`manual_grad_sync`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from mengzi_ray.data.records import ImageRecord
from mengzi_ray.evaluation.caption_metrics import tokenize_for_metrics
from mengzi_ray.evaluation.cider_d import CiderD
from mengzi_ray.modeling.generation import sample
from mengzi_ray.text import decode_caption
from mengzi_ray.training.examples import read_text_table
from mengzi_ray.training.tasks import Batch, CaptionTask, NegativePool, _stack


class ScstTask(CaptionTask):
    per_image_train = True
    manual_grad_sync = True

    def __init__(self, card, tokenizer):  # noqa: ANN001  (same signature as CaptionTask)
        super().__init__(card, tokenizer)
        self._refs: list[list[str]] = []
        self.last_reward = float("nan")

    @cached_property
    def cider(self) -> CiderD:
        texts = read_text_table(self.card.data.text, self.card.data.train_split, self.card.data.kind).to_pylist()
        refs: dict[str, list[str]] = {}
        for row in texts:
            refs.setdefault(row["image_id"], []).append(tokenize_for_metrics(row["text"], "char"))
        return CiderD.from_references(refs)

    def upstream(self) -> None:
        """No upstream stage: `make_batch` keeps the references of its rows for the next `loss` call."""
        return None

    def make_batch(self, rows: Sequence[ImageRecord], rng: np.random.Generator, pool: NegativePool) -> Batch:
        """Test-layout inputs per image; the references wait for the matching `loss` call (called in pairs)."""
        self._refs = [[tokenize_for_metrics(t, "char") for t in r.texts] for r in rows]
        return _stack([self.test_tz.test_example(r.od_labels, r.features) for r in rows])

    def _captions(self, sequences: torch.Tensor) -> list[str]:
        return [tokenize_for_metrics(decode_caption(self.tokenizer, s.tolist()), "char") for s in sequences]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        core = getattr(model, "module", model)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["img_feats"])
        max_length = self.test_tz.layout.max_seq_a_length
        n = self.card.scst.sample_n
        core.eval()
        with torch.no_grad():
            greedy = core.generate(*inputs, num_beams=1, max_length=max_length).sequences[:, 0]
        core.train()
        sampled = sample(
            core.bert, core.cls, core.special_ids(), *inputs, max_length=max_length, num_samples=n,
            temperature=self.card.scst.temperature, od_labels_start_posid=core.config.max_seq_a_length,
        )
        baseline = self.cider.score(self._captions(greedy), self._refs)
        refs = [r for r in self._refs for _ in range(n)]
        reward = self.cider.score(self._captions(sampled.sequences), refs)
        self.last_reward = float(reward.mean())
        advantage = torch.as_tensor(reward - np.repeat(baseline, n), dtype=torch.float32, device=sampled.scores.device)
        return -(advantage * sampled.scores).mean()
