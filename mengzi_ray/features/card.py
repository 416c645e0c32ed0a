"""Job cards of the feature stage: `extract`, `import-oscar`, `export-oscar` (see jobs/extract_*.yaml).

`DetectorSection` is also what the serving app uses to build its detector (features.detectors.build_detector).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from mengzi_ray.config import Card, RaySection, Section
from mengzi_ray.features.decode import DEFAULT_MAX_PIXELS

DETECTRON2_INSTALL = (
    "detectron2 is not importable in this Python environment. It has no PyPI wheel; build it from source "
    "against the installed torch: `pip install --no-build-isolation 'git+https://github.com/facebookresearch/"
    "detectron2.git'` (needs a C++ compiler, and nvcc for GPU ops), or choose detector.backend: torchvision_c4"
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp")


class DetectorSection(Section):
    """Which detector, its weights, and VinVL's inference settings (oscar-formats.md §1.2 gives the originals).

    Trunk: torchvision ResNet/ResNeXt layers 1-3 (stride 16, 1024 channels) as the C4 trunk and layer4 as the box
    head, average-pooled to 2048 per box. depth/groups/width_per_group = 152/32/8 is VinVL's X152-C4 shape; a
    small width_per_group gives a cheap trunk with the same 2048-d output (tests, demo).
    """

    backend: Literal["torchvision_c4", "given_boxes", "detectron2"] = "torchvision_c4"
    weights: str | None = Field(None, description="safetensors file (local or s3://) of the detector state dict")
    allow_random_weights: bool = Field(False, description="random init when weights is None (tests/demo only)")
    seed: int = Field(0, description="random-init seed, so every actor builds the same random detector")
    depth: Literal[50, 101, 152] = 152
    groups: int = Field(32, ge=1)
    width_per_group: int = Field(8, ge=1)
    num_classes: int = Field(1595, ge=2, description="box classes including background (index 0)")
    label_map: str | None = Field(
        None, description="JSON list of the num_classes-1 class names in index order; default: the tag vocabulary"
    )
    attribute_map: str | None = Field(None, description="JSON list of attribute names (index 0 = none); enables "
                                      "the attribute head")
    test_min_size: int = Field(600, ge=16, description="resize so the short side is this (VinVL 600)")
    test_max_size: int = Field(1000, ge=16, description="... unless the long side would exceed this (VinVL 1000)")
    rpn_pre_nms_top_n: int = Field(6000, ge=1)
    rpn_post_nms_top_n: int = Field(300, ge=1, description="proposals per image scored by the box head")
    nms_iou: float = Field(0.3, gt=0, le=1, description="per-class NMS IoU")
    score_threshold: float = Field(0.2, ge=0, le=1)
    min_boxes: int = Field(10, ge=0, description="below this many detections, top-scoring proposals fill up")
    max_boxes: int = Field(100, ge=1, description="regions kept per image, best first")
    ignore_box_regression: bool = Field(True, description="keep the proposal boxes (VinVL extraction)")
    given_boxes_featurizer: Literal["torchvision_c4", "pixel_crops"] = Field(
        "torchvision_c4", description="given_boxes backend: C4 box head on the boxes, or the pixel-crop featurizer"
    )
    detectron2_config: str | None = Field(None, description="detectron2 backend: its config YAML file")

    @model_validator(mode="after")
    def _consistent(self) -> "DetectorSection":
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes={self.min_boxes} exceeds max_boxes={self.max_boxes}")
        if self.backend == "detectron2":
            if importlib.util.find_spec("detectron2") is None:
                raise ValueError(DETECTRON2_INSTALL)
            if not self.detectron2_config or not self.weights:
                raise ValueError("backend detectron2 needs detectron2_config and weights")
        uses_c4 = self.backend == "torchvision_c4" or (
            self.backend == "given_boxes" and self.given_boxes_featurizer == "torchvision_c4"
        )
        if uses_c4 and self.weights is None and not self.allow_random_weights:
            raise ValueError(
                "weights is not set: give a safetensors file (local or s3://), or set allow_random_weights: true "
                "for a random-init detector (tests and demos only: its features mean nothing)"
            )
        return self


class InputSection(Section):
    """Where the images are: a local dir, an s3:// prefix (both recursive), or a jsonl manifest.

    Manifest lines: {"uri": ..., "image_id": optional, "boxes": optional [[x1,y1,x2,y2], ...],
    "labels": optional [names, one per box]}.
    """

    uri: str = Field(..., min_length=1)
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), description="file extensions listed from a dir/prefix")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard (width x height)")
    rows_per_block: int = Field(16, ge=1, description="inputs per read/decode task")
    decode_num_cpus: float = Field(
        0.5, gt=0, description="CPUs per read/decode task; differing from actors.num_cpus keeps decoding in tasks "
        "(Ray Data fuses a task stage into the actor stage when their resources match)"
    )


class ActorsSection(Section):
    """The detector actor pool: ActorPoolStrategy(min_size, max_size), resources per actor, batch size."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="images per detector call")

    @model_validator(mode="after")
    def _sizes(self) -> "ActorsSection":
        if self.min_size > self.max_size:
            raise ValueError(f"min_size={self.min_size} exceeds max_size={self.max_size}")
        return self


class ExtractCard(Card):
    """`mengzi-ray extract`: images → <output>/features/*.parquet + <output>/errors/*.parquet + summary.json."""

    ray: RaySection = RaySection()
    input: InputSection
    output: str = Field(..., min_length=1, description="dataset dir (local or s3://)")
    detector: DetectorSection
    actors: ActorsSection = ActorsSection()
    max_error_fraction: float = Field(0.05, ge=0, le=1, description="exit non-zero above this failed fraction")
    chunk_size: int = Field(2000, ge=1, description="inputs per written chunk: the unit of resume after a crash")
    job_id: str | None = Field(None, description="written to errors/; default: a fresh id per run")


class ExportOscarCard(Card):
    """`mengzi-ray export-oscar`: our feature dataset → VinVL TSV layout (features.tsv, predictions.tsv,
    imageid2idx.json, .lineidx files); streams in the driver process like the import."""

    dataset: str = Field(..., description="dataset dir holding features/ (local or s3://)")
    output: str = Field(..., min_length=1, description="dir (local or s3://) for the TSV files")
