"""Batched inference helpers shared by training validation, the evaluate job, the service and the benchmarks.

`collate` stacks the per-example numpy dicts of `mengzi_ray.data` builders into tensors; `caption_images` runs
beam search over image records in the captioning test layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.captioning import CaptionTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.modeling.heads import OscarForCaptioning
from mengzi_ray.text import decode_caption


def collate(examples: Sequence[dict[str, np.ndarray]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Stack per-example numpy arrays into batch tensors on `device`."""
    return {k: torch.as_tensor(np.stack([e[k] for e in examples])).to(device) for k in examples[0]}



@torch.no_grad()
def caption_images(
    model: OscarForCaptioning,
    tokenizer: PreTrainedTokenizerBase,
    tensorizer: CaptionTensorizer,
    records: Sequence[ImageRecord],
    *,
    num_beams: int = 5,
    batch_size: int = 32,
) -> dict[str, tuple[str, float]]:
    """image_id → (caption, confidence = exp(score)). `tensorizer` must be in the test layout (for_generation)."""
    model.eval()
    device = next(model.parameters()).device
    max_length = tensorizer.layout.max_seq_a_length
    out: dict[str, tuple[str, float]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = collate([tensorizer.test_example(r.od_labels, r.features) for r in chunk], device)
        result = model.generate(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["img_feats"],
            num_beams=num_beams, max_length=max_length,
        )
        for record, ids, score in zip(chunk, result.sequences[:, 0], result.scores[:, 0]):
            out[record.image_id] = (decode_caption(tokenizer, ids.tolist()), float(score.exp()))
    return out
