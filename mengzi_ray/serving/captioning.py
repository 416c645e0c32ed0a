"""Caption requests for serving: a `@serve.batch` batch of region sets → captions, no Ray involved.

The Serve `Captioner` deployment (deployments.py) calls `CaptionEngine.caption` once per `@serve.batch` batch;
requests in one batch may ask for different beam counts, so they are grouped by (num_beams, top_n) and each group
is one batched call of the model dir's `mengzi_ray.inference.Captioner` (layout, tags and decoding as evaluation).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mengzi_ray.inference import Captioner
from mengzi_ray.text.tags import region_tags


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
    """Groups a batch of caption requests by decoding settings and runs each group through one `Captioner`."""

    def __init__(self, captioner: Captioner, model_dir: str):
        self.captioner = captioner
        self.model_dir = model_dir

    @classmethod
    def from_model_dir(cls, model_dir: str, *, max_gen_length: int = 20, length_penalty: float = 1.0,
                       device: str | None = None, dtype: str | None = None) -> "CaptionEngine":
        """`device` None: cuda if available; `dtype` None: the checkpoint's float32."""
        # One @serve.batch batch is one generate call per (num_beams, top_n) group: no inner slicing.
        captioner = Captioner.from_model_dir(model_dir, device, dtype, max_gen_length=max_gen_length,
                                             length_penalty=length_penalty, batch_size=1024)
        return cls(captioner, str(model_dir))

    @property
    def max_regions(self) -> int:
        return self.captioner.max_regions

    @property
    def feature_dim(self) -> int:
        return self.captioner.feature_dim

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
            captions = self.captioner.caption(
                [jobs[i].regions.features for i in indices],
                [self.captioner.od_labels(jobs[i].regions.labels, jobs[i].regions.tags) for i in indices],
                num_beams=num_beams, num_keep_best=top_n,
            )
            seconds = time.perf_counter() - start
            for i, best in zip(indices, captions):
                used = min(len(jobs[i].regions.tags), self.max_regions)
                results[i] = CaptionResult(best, used, len(jobs), seconds)
        return [r for r in results if r is not None]
