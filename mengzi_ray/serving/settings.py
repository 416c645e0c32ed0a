"""Settings of the serving application: what `serve/config.yaml` puts under `applications[].args`.

`build_app(ServeAppConfig)` (app.py) turns them into Serve deployments. Every section forbids unknown keys, so a
typo in the YAML fails `serve run` / `serve deploy` at start-up with the dotted field named, never at request time.
Paths are local paths or s3:// URIs (model dirs go through `mengzi_ray.storage`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mengzi_ray.config import Section
from mengzi_ray.features.card import DetectorSection
from mengzi_ray.index.card import SearchSection


class ReplicaSection(Section):
    """Resources and autoscaling of one deployment. min/max replicas are always explicit (Serve's default
    max_replicas is 1, which silently disables scaling)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU)")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(16, ge=1, description="requests a replica holds at once (queue beyond)")
    health_check_period_s: float = Field(10.0, gt=0)
    stall_timeout_s: float = Field(
        300.0, gt=0, description="health check fails when a model call has run longer than this (a wedged replica)"
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ReplicaSection":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        return {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            },
        }


class BatchedReplicaSection(ReplicaSection):
    """A model deployment whose main method runs under `@serve.batch`."""

    max_batch_size: int = Field(8, ge=1, description="requests per model call")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a partial batch waits for more")

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "BatchedReplicaSection":
        # A replica never holds more than max_ongoing_requests, so a larger batch could never fill.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size ({self.max_batch_size})"
            )
        return self


class CaptionerSection(BatchedReplicaSection):
    model_dir: str = Field(..., description="OscarForCaptioning model dir (config.json + weights + vocab.txt)")
    max_gen_length: int = Field(20, ge=3, description="caption budget G in tokens, [CLS] and [SEP] included")
    length_penalty: float = Field(1.0, description="beam-search length penalty (score / length**penalty)")


class GallerySection(Section):
    """The searchable gallery, built from a feature dataset (docs/data-contracts.md) at start-up or on an admin reload."""

    features: str = Field(..., description="features Parquet file or dir (one row per image)")
    texts: str | None = Field(None, description="text jsonl (image_id, text, kind, split): the caption gallery")
    split: str | None = Field(None, description="with texts: only the images and captions of this split (None: all)")
    max_images: int | None = Field(None, ge=1, description="use the first N images (None: all)")
    index: str | None = Field(None, description="`mengzi-ray index` output with the gallery images' dual-encoder "
                              "vectors (None: embedded when the gallery loads; unused without a dual encoder)")
    images_root: str | None = Field(
        None,
        description="local dir the gallery route may serve image files from (PNG/JPEG only); None: it serves none",
    )


class RetrieverSection(BatchedReplicaSection):
    model_dir: str = Field(..., description="OscarForRetrieval model dir")
    gallery: GallerySection
    candidates: int = Field(100, ge=1, description="candidate-stage shortlist re-ranked by the cross-encoder")
    first_stage: Literal["auto", "dual_encoder", "tfidf"] = Field(
        "auto", description="candidate stage: auto = the dual encoder when the model dir has one, else TF-IDF")
    search: SearchSection = Field(SearchSection(), description="the dual-encoder stage's search (exact or ivf)")
    rerank_chunk: int = Field(256, ge=1, description="pairs per cross-encoder forward pass")


class DetectorDeploymentSection(BatchedReplicaSection):
    """The detector deployment; `model` is the extraction job's own DetectorSection, so serving and extraction
    build the same detector from the same keys."""

    model: DetectorSection


class LimitsSection(Section):
    """Request bounds; anything beyond is a 4xx naming the limit."""

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body size")
    max_pixels: int = Field(16_000_000, ge=1, description="decoded image width × height")
    max_text_chars: int = Field(64, ge=1, description="search query length in characters")
    max_k: int = Field(50, ge=1, description="largest top-k of a search")
    max_beams: int = Field(5, ge=1, description="largest num_beams of a caption request")
    max_regions: int = Field(100, ge=1, description="precomputed regions per caption request")
    call_timeout_s: float = Field(
        55.0, gt=0, description="server-side limit of each model call; client headers cannot lift it (503 beyond)"
    )


class ServeAppConfig(Section):
    """The whole application; `args` of `serve/config.yaml`."""

    captioner: CaptionerSection
    retriever: RetrieverSection
    detector: DetectorDeploymentSection
    ingress: ReplicaSection = Field(default_factory=ReplicaSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    auth_token_env: str = Field(
        "MENGZI_SERVE_TOKEN", min_length=1, description="env var holding the bearer token every /v1/* route requires"
    )
    allow_anonymous: bool = Field(
        False,
        description="serve without a token when the env var is empty (local demo on 127.0.0.1 only); otherwise an "
        "empty token refuses to start",
    )
    default_num_beams: int = Field(3, ge=1)
    resource_check: Literal["refuse", "warn"] = Field(
        "refuse",
        description="at start-up, when the cluster's nodes cannot place every deployment's min_replicas: refuse to "
        "start naming the deployment (a fixed cluster, a laptop), or only warn (an autoscaling cluster adds nodes)",
    )

    @model_validator(mode="after")
    def _default_within_limits(self) -> "ServeAppConfig":
        if self.default_num_beams > self.limits.max_beams:
            raise ValueError(f"default_num_beams ({self.default_num_beams}) exceeds limits.max_beams ({self.limits.max_beams})")
        return self
