"""The model deployments: Detector, Captioner, Retriever. The ingress (api.py) composes them by handle.

Each batched method runs under `@serve.batch`; the batch size and wait come from the app settings through
`set_max_batch_size` / `set_batch_wait_timeout_s` in the constructor (the decorator's numbers are only defaults).
A bad item of a batch comes back as an `ApiError` in its slot, so it never fails its neighbours. The model work
runs in a worker thread, so the replica's event loop stays free for health checks and queueing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
from ray import serve

from mengzi_ray.features.schema import region_matrix
from mengzi_ray.modeling.model_dir import input_layout
from mengzi_ray.serving.captioning import CaptionEngine, CaptionJob, CaptionResult, RegionSet
from mengzi_ray.serving.errors import ApiError
from mengzi_ray.serving.gallery import load_gallery
from mengzi_ray.inference import MatchScorer
from mengzi_ray.serving.retrieval import Hit, RetrievalEngine, SearchQuery
from mengzi_ray.serving.settings import (
    BatchedReplicaSection,
    CaptionerSection,
    DetectorDeploymentSection,
    GallerySection,
    RetrieverSection,
)

log = logging.getLogger("ray.serve")
T = TypeVar("T")


class BatchStats:
    """Histogram of the batch sizes a replica ran (returned by `stats()`; shows that batching happens)."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()

    def record(self, size: int, what: str) -> None:
        self.sizes[size] += 1
        log.info("%s batch of %d", what, size)

    def as_dict(self) -> dict[str, Any]:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


class ModelWatch:
    """Runs model work in a worker thread and remembers when each running call started, so the replica's health
    check fails once a call has run past `stall_timeout_s` (a wedged model thread), and Serve replaces the replica."""

    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.started: dict[int, float] = {}
        self._next = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._next += 1
        key = self._next
        self.started[key] = time.monotonic()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            del self.started[key]

    def check(self, what: str) -> None:
        if self.started:
            running = time.monotonic() - min(self.started.values())
            if running > self.stall_timeout_s:
                raise RuntimeError(f"{what}: a model call has not answered for {running:.0f} s (stall_timeout_s)")


def configure_batching(method: Any, section: BatchedReplicaSection) -> None:
    method.set_max_batch_size(section.max_batch_size)
    method.set_batch_wait_timeout_s(section.batch_wait_timeout_s)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def check_regions(regions: RegionSet, feature_dim: int) -> ApiError | None:
    """A precomputed region set the model can take, or the error naming what is wrong with it."""
    feats = regions.features
    if feats.size == 0 and not regions.tags:
        return None  # no regions: the model sees tags-only input, as for an empty detection
    if feats.ndim != 2 or feats.shape[1] != feature_dim:
        return ApiError(422, "bad_regions", f"regions.features must be (N, {feature_dim}), got {feats.shape}", "regions.features")
    if feats.shape[0] != len(regions.tags):
        return ApiError(422, "bad_regions", f"{feats.shape[0]} region vectors but {len(regions.tags)} tags", "regions.tags")
    if not np.isfinite(feats).all():
        return ApiError(422, "bad_regions", "regions.features contain NaN or inf", "regions.features")
    return None


@dataclass
class DetectedImage:
    """The detector's view of one request image, plus what the page draws."""

    regions: RegionSet
    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]
    width: int
    height: int


@serve.deployment(name="Detector")
class Detector:
    def __init__(self, section: DetectorDeploymentSection):
        from mengzi_ray.features.detectors.base import build_detector

        self.section = section
        self.detector = build_detector(section.model)
        self.stats = BatchStats()
        self.watch = ModelWatch(section.stall_timeout_s)
        configure_batching(self.detect, section)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> list[DetectedImage | ApiError]:
        """items: (RGB uint8 (H, W, 3), given boxes (N, 4) or None) per request."""
        from mengzi_ray.features.detectors.base import detections_to_row

        self.stats.record(len(items), "detect")
        if self.section.model.backend == "given_boxes" and any(boxes is None for _, boxes in items):
            missing = ApiError(422, "boxes_required", "the given_boxes detector needs `boxes` with the image", "boxes")
            ready = [(image, boxes) for image, boxes in items if boxes is not None]
        else:
            missing, ready = None, items
        found = await self.watch.run(self._detect_each_on_failure, ready) if ready else []
        results: list[DetectedImage | ApiError] = []
        it = iter(found)
        for image, boxes in items:
            if missing is not None and boxes is None:
                results.append(missing)
                continue
            det = next(it)
            if isinstance(det, ApiError):
                results.append(det)
                continue
            height, width = image.shape[:2]
            row = detections_to_row(det, image_id="request", source="request", width=width, height=height, detector=self.detector.name)
            results.append(
                DetectedImage(
                    RegionSet(region_matrix(row["features"]), row["tags"], row["labels"]), row["boxes"], row["labels"],
                    row["scores"], width, height
                )
            )
        return results

    def _detect_each_on_failure(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> list[Any]:
        """Detect the batch; if it fails, detect image by image, so one image the detector cannot take (e.g. a
        degenerate size or bad given boxes) gets its own 422 and the rest of the batch still succeeds."""
        try:
            return self.detector.detect([i for i, _ in items], [b for _, b in items])
        except Exception as exc:
            if len(items) == 1:
                return [self._refusal(items[0], exc)]
        out: list[Any] = []
        for item in items:
            try:
                out.extend(self.detector.detect([item[0]], [item[1]]))
            except Exception as exc:
                out.append(self._refusal(item, exc))
        return out

    @staticmethod
    def _refusal(item: tuple[np.ndarray, np.ndarray | None], exc: Exception) -> ApiError:
        """A ValueError is the input's fault (422); anything else (CUDA OOM, a broken model) is the server's (503)."""
        log.error("detector failed on a %s image: %s", "x".join(map(str, item[0].shape)), _short(exc))
        if isinstance(exc, ValueError):
            return ApiError(422, "detect_failed", f"the detector cannot process this image (shape {item[0].shape}): "
                            f"{_short(exc)}", "image")
        return ApiError(503, "detector_unavailable", f"the detector failed on this request ({type(exc).__name__}); "
                        "try again")

    def info(self) -> dict[str, Any]:
        return {"name": self.detector.name, "backend": self.section.model.backend, **self.stats.as_dict()}

    def check_health(self) -> None:
        if self.detector is None:
            raise RuntimeError("detector not loaded")
        self.watch.check("detector")


@serve.deployment(name="Captioner")
class Captioner:
    def __init__(self, section: CaptionerSection):
        self.engine = CaptionEngine.from_model_dir(section.model_dir, max_gen_length=section.max_gen_length,
                                                  length_penalty=section.length_penalty)
        self.stats = BatchStats()
        self.watch = ModelWatch(section.stall_timeout_s)
        configure_batching(self.caption, section)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def caption(self, jobs: list[CaptionJob]) -> list[CaptionResult | ApiError]:
        self.stats.record(len(jobs), "caption")
        errors = [check_regions(job.regions, self.engine.feature_dim) for job in jobs]
        good = [job for job, err in zip(jobs, errors) if err is None]
        done = iter(await self.watch.run(self.engine.caption, good) if good else [])
        return [err if err is not None else next(done) for err in errors]

    def info(self) -> dict[str, Any]:
        cfg = self.engine.captioner.config
        return {
            "model_dir": self.engine.model_dir,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size,
            "max_gen_length": self.engine.captioner.max_gen_length,
            "max_regions": self.engine.max_regions,
            "input_layout": input_layout(cfg),
            **self.stats.as_dict(),
        }

    def check_health(self) -> None:
        if self.engine.captioner.model is None:
            raise RuntimeError("caption model not loaded")
        self.watch.check("captioner")


@serve.deployment(name="Retriever")
class Retriever:
    """Gallery + two-stage search. `user_config: {gallery: {...}}` (a GallerySection) replaces the gallery of
    every replica in place when `serve deploy` changes it; without it the args' gallery is used."""

    def __init__(self, section: RetrieverSection):
        self.section = section
        encoder = MatchScorer.from_model_dir(section.model_dir, batch_size=section.rerank_chunk)
        self.gallery_section = section.gallery
        self.engine = RetrievalEngine(encoder, load_gallery(section.gallery, encoder.config.tag_map),
                                      section.candidates, section.first_stage, section.gallery.index, section.search)
        self.stats = BatchStats()
        self.watch = ModelWatch(section.stall_timeout_s)
        configure_batching(self.search, section)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        wanted = GallerySection.model_validate(user_config.get("gallery") or self.section.gallery.model_dump())
        if wanted != self.gallery_section:
            self.engine.set_gallery(load_gallery(wanted, self.engine.encoder.config.tag_map), wanted.index)
            self.gallery_section = wanted
            log.info("gallery reloaded: %d images from %s", len(self.engine.gallery), wanted.features)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def search(self, queries: list[SearchQuery]) -> list[list[dict[str, Any]] | ApiError]:
        self.stats.record(len(queries), "search")
        errors: list[ApiError | None] = []
        for query in queries:
            if query.regions is not None:
                errors.append(check_regions(query.regions, self.engine.encoder.feature_dim))
                if errors[-1] is None and not self.engine.gallery.captions:
                    errors[-1] = ApiError(409, "no_caption_gallery", "this deployment has no caption gallery (gallery.texts)")
            else:
                errors.append(None)
        good = [q for q, err in zip(queries, errors) if err is None]
        done = iter(await self.watch.run(self.engine.search, good) if good else [])
        return [err if err is not None else self._rows(query, next(done)) for query, err in zip(queries, errors)]

    def _rows(self, query: SearchQuery, hits: list[Hit]) -> list[dict[str, Any]]:
        """Hits → JSON rows: image hits name the image and its tags; caption hits the text and its image."""
        gallery = self.engine.gallery
        if query.text is not None:
            return [{"image_id": gallery.image_ids[h.index], "score": h.score, "tags": gallery.regions[h.index].tags} for h in hits]
        return [{"caption": gallery.captions[h.index], "image_id": gallery.caption_image_ids[h.index], "score": h.score} for h in hits]

    def image_bytes(self, image_id: str) -> bytes | None:
        return self.engine.gallery.image_bytes(image_id, self.gallery_section.images_root)

    def info(self) -> dict[str, Any]:
        gallery = self.engine.gallery
        return {
            "model_dir": self.section.model_dir,
            "input_layout": input_layout(self.engine.encoder.config),
            "gallery": self.gallery_section.features,
            "gallery_images": len(gallery),
            "gallery_captions": len(gallery.captions),
            "candidate_stage": (f"dual-encoder inner product, {self.engine.dual.image_search.describe()} search"
                                if self.engine.dual is not None else "char n-gram TF-IDF over Chinese tags"),
            "candidates": self.engine.candidates,
            **self.stats.as_dict(),
        }

    def check_health(self) -> None:
        if not len(self.engine.gallery):
            raise RuntimeError("empty gallery")
        self.watch.check("retriever")
