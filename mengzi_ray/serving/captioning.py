"""Caption inference for serving: a model dir → captions for a batch of region sets, no Ray involved.

The Serve `Captioner` deployment (deployments.py) calls `CaptionEngine.caption` once per `@serve.batch` batch;
requests in one batch may ask for different beam counts, so they are grouped by (num_beams, top_n) and each group
is one batched `generate` call.
"""

from __future__ import annotations

import logging

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mengzi_ray.modeling.model_dir import input_layout
from mengzi_ray.data.captioning import CaptionTensorizer
from mengzi_ray.evaluation.caption_inference import generation_layout
from mengzi_ray.modeling import OscarForCaptioning
from mengzi_ray.text import decode_caption, load_tokenizer, tag_string
from mengzi_ray.text.tags import region_tags

log = logging.getLogger(__name__)


@dataclass
class RegionSet:
    """One image as the models see it: (N, 2054) Oscar region vectors and the N Chinese tags (detector order)."""

    features: np.ndarray
    tags: list[str]
    labels: list[str] | None = None  # the detector's English class names, when the regions came from it

    def tags_for(self, tag_map: str | None) -> list[str]:
        """The tags a model with `tag_map` is fed (text.tags.region_tags): re-translated from the English labels
        for a dir trained with another map (langboat for released dirs), else as given."""
        return region_tags(self.labels, self.tags, tag_map)


@dataclass
class CaptionJob:
    regions: RegionSet
    num_beams: int
    top_n: int


@dataclass
class CaptionResult:
    captions: list[tuple[str, float]]  # (caption, confidence = exp(length-normalised log-prob)), best first
    regions_used: int
    batch_size: int  # requests served by the same model call (observable batching)
    model_seconds: float


class CaptionEngine:
    """Loads an `OscarForCaptioning` dir once; captions batches of region sets on CPU or one GPU."""

    def __init__(self, model_dir: str, *, max_gen_length: int = 20, length_penalty: float = 1.0, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = OscarForCaptioning.from_pretrained(model_dir).to(self.device).eval()
        self.model_dir = str(model_dir)
        source = self.model.source_dir or model_dir
        self.tokenizer = load_tokenizer(source, do_lower_case=self.model.config.do_lower_case)
        self.tensorizer = CaptionTensorizer(self.tokenizer, generation_layout(self.model.config, max_gen_length))
        log.info("captioner %s: input layout %s", model_dir, input_layout(self.model.config))
        self.max_gen_length = max_gen_length
        self.length_penalty = length_penalty

    @property
    def max_regions(self) -> int:
        return self.tensorizer.layout.max_img_seq_length

    @property
    def feature_dim(self) -> int:
        return self.tensorizer.layout.img_feature_dim

    @torch.no_grad()
    def caption(self, jobs: Sequence[CaptionJob]) -> list[CaptionResult]:
        """One result per job, in order. Regions beyond the model's max_img_seq_length are dropped (detector order
        is score order, so the weakest go) and `regions_used` says how many were kept."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            if not 1 <= job.top_n <= job.num_beams:
                raise ValueError(f"top_n ({job.top_n}) must be between 1 and num_beams ({job.num_beams})")
            groups[(job.num_beams, job.top_n)].append(index)
        results: list[CaptionResult | None] = [None] * len(jobs)
        for (num_beams, top_n), indices in groups.items():
            start = time.perf_counter()
            examples = [
                self.tensorizer.test_example(tag_string(jobs[i].regions.tags_for(self.model.config.tag_map)),
                                             jobs[i].regions.features)
                for i in indices
            ]
            batch = {k: torch.as_tensor(np.stack([e[k] for e in examples])).to(self.device) for k in examples[0]}
            out = self.model.generate(
                batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["img_feats"],
                num_beams=num_beams, max_length=self.max_gen_length, length_penalty=self.length_penalty,
                num_keep_best=top_n,
            )
            seconds = time.perf_counter() - start
            for row, i in enumerate(indices):
                captions = [
                    (decode_caption(self.tokenizer, out.sequences[row, j].tolist()), float(out.scores[row, j].exp()))
                    for j in range(top_n)
                ]
                used = min(len(jobs[i].regions.tags), self.max_regions)
                results[i] = CaptionResult(captions, used, len(jobs), seconds)
        return [r for r in results if r is not None]
