"""`Captioner`: a captioning model dir → beam-search captions for batches of region sets.

Callers: the evaluate job's Ray Data actors (`evaluation.caption_inference`), Serve's Captioner replicas
(`serving.captioning`), training-time validation (`training.tasks.CaptionTask`) and the benchmarks. The test layout
is the model's training layout with a caption budget of `max_gen_length` (microsoft/Oscar `run_captioning.py`,
`CaptionTensorizer` with `is_train=False`: the tag budget L − A of training is kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.inference.batch import ModelDirRunner, collate, model_placement
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import decode_caption, tag_string
from mengzi_ray.text.tags import region_tags


def generation_layout(config: OscarConfig, max_gen_length: int) -> CaptionLayout:
    """The test layout of a model: its training layout (config.json) with a caption budget of `max_gen_length`."""
    trained = CaptionLayout(
        max_seq_a_length=config.max_seq_a_length,
        max_seq_length=config.max_seq_length,
        max_img_seq_length=config.max_img_seq_length,
        img_feature_dim=config.img_feature_dim,
        add_od_labels=config.add_od_labels,
    )
    return trained.for_generation(max_gen_length)


class Captioner(ModelDirRunner):
    """An `OscarForCaptioning` with its tokenizer and test layout.

    Args:
        model: the captioning model (its config carries the training layout); put in eval mode here.
        tokenizer: the model dir's tokenizer.
        max_gen_length: caption budget G in tokens, [CLS] and [SEP] included.
        length_penalty: beam score / length**penalty.
        batch_size: images per `generate` call.
    """

    model_cls = OscarForCaptioning

    def __init__(self, model: OscarForCaptioning, tokenizer: PreTrainedTokenizerBase, *, max_gen_length: int = 20,
                 length_penalty: float = 1.0, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tensorizer = CaptionTensorizer(tokenizer, generation_layout(model.config, max_gen_length))
        self.max_gen_length = max_gen_length
        self.length_penalty = length_penalty
        self.batch_size = batch_size

    @property
    def max_regions(self) -> int:
        return self.tensorizer.layout.max_img_seq_length

    @property
    def feature_dim(self) -> int:
        return self.tensorizer.layout.img_feature_dim

    def od_labels(self, labels: Sequence[str] | None, tags: Sequence[str]) -> str:
        """The od-label string this model is fed for one image: the stored Chinese `tags`, or, for a dir trained
        with a named tag map (released dirs: langboat), the English detector `labels` translated with it."""
        return tag_string(region_tags(labels, tags, self.config.tag_map))

    @torch.no_grad()
    def caption(self, regions: Sequence[np.ndarray], od_labels: Sequence[str], *, num_beams: int = 5,
                num_keep_best: int = 1) -> list[list[tuple[str, float]]]:
        """Per image, the `num_keep_best` best (caption, confidence = exp(length-normalised log-prob)), best first.

        regions[i]: (N_i, img_feature_dim) float32; regions beyond the layout's max_img_seq_length are dropped
        (detector order is score order). od_labels[i]: the image's tag string (see `od_labels`)."""
        if len(regions) != len(od_labels):
            raise ValueError(f"{len(regions)} region sets but {len(od_labels)} od-label strings")
        if not 1 <= num_keep_best <= num_beams:
            raise ValueError(f"num_keep_best ({num_keep_best}) must be between 1 and num_beams ({num_beams})")
        device, dtype = model_placement(self.model)
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(regions), self.batch_size):
            stop = start + self.batch_size
            examples = [self.tensorizer.test_example(tags, feats) for feats, tags in zip(regions[start:stop], od_labels[start:stop])]
            batch = collate(examples, device, dtype)
            result = self.model.generate(
                batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["img_feats"],
                num_beams=num_beams, max_length=self.max_gen_length, length_penalty=self.length_penalty,
                num_keep_best=num_keep_best,
            )
            sequences, scores = result.sequences.cpu(), result.scores.float().exp().cpu()
            out.extend(
                [(decode_caption(self.tokenizer, sequences[row, j].tolist()), float(scores[row, j])) for j in range(num_keep_best)]
                for row in range(len(examples))
            )
        return out

    def caption_records(self, records: Sequence[ImageRecord], *, num_beams: int = 5) -> dict[str, tuple[str, float]]:
        """image_id → (best caption, confidence) for records whose od_labels are already this model's tag string."""
        best = self.caption([r.features for r in records], [r.od_labels for r in records], num_beams=num_beams)
        return {r.image_id: captions[0] for r, captions in zip(records, best)}
