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
    """Which detector, its weights, and every inference setting of its Faster R-CNN C4 path.

    The settings restate maskrcnn_benchmark's config keys (named in each field's description) so that a detector
    imported with `mengzi-ray import-detector` (docs/detectors.md) runs exactly as scene_graph_benchmark's
    `tools/test_sg_net.py` does. `model_dir` points at such an imported dir: its `detector.yaml` supplies every
    setting, its `model.safetensors` the weights and its `labelmap.json` the class and attribute names; a field set
    explicitly in the card overrides the dir's value (features.detector_dir.resolve_detector).

    The defaults describe mengzi_ray's own random-init C4 (tests, demo): RGB in [0, 1] with ImageNet statistics,
    torchvision's stride placement. depth/groups/width_per_group = 152/32/8 is VinVL's X152-C4 shape; a small
    width_per_group gives a cheap trunk with the same 2048-d output.
    """

    backend: Literal["torchvision_c4", "given_boxes", "detectron2"] = "torchvision_c4"
    model_dir: str | None = Field(None, description="detector dir written by import-detector (local or s3://)")
    weights: str | None = Field(None, description="safetensors file (local or s3://) of the detector state dict")
    allow_random_weights: bool = Field(False, description="random init when weights is None (tests/demo only)")
    seed: int = Field(0, description="random-init seed, so every actor builds the same random detector")
    depth: Literal[50, 101, 152] = Field(152, description="MODEL.BACKBONE.CONV_BODY R-<depth>-C4")
    groups: int = Field(32, ge=1, description="MODEL.RESNETS.NUM_GROUPS")
    width_per_group: int = Field(8, ge=1, description="MODEL.RESNETS.WIDTH_PER_GROUP")
    stride_in_1x1: bool = Field(False, description="MODEL.RESNETS.STRIDE_IN_1X1 (True: MSRA ResNet, stride on "
                                "the first 1x1 conv)")
    stem_out_channels: int = Field(64, ge=1, description="MODEL.RESNETS.STEM_OUT_CHANNELS")
    res2_out_channels: Literal[256] = Field(256, description="MODEL.RESNETS.RES2_OUT_CHANNELS (256: 2048-d "
                                            "region features, the Oscar layout)")
    num_classes: int = Field(1595, ge=2, description="box classes including background (index 0)")
    label_map: str | None = Field(
        None, description="JSON list of the num_classes-1 class names in index order; default: the tag vocabulary"
    )
    attribute_map: str | None = Field(None, description="JSON list of attribute names (index 0 = none); enables "
                                      "the attribute head")
    input_format: Literal["rgb01", "bgr255"] = Field(
        "rgb01", description="pixels fed to the trunk: RGB in [0, 1], or BGR in [0, 255] (INPUT.TO_BGR255)"
    )
    pixel_mean: list[float] = Field([0.485, 0.456, 0.406], min_length=3, max_length=3,
                                    description="INPUT.PIXEL_MEAN, in input_format's channel order and range")
    pixel_std: list[float] = Field([0.229, 0.224, 0.225], min_length=3, max_length=3,
                                   description="INPUT.PIXEL_STD")
    exif_orientation: bool = Field(True, description="apply EXIF orientation when decoding (scene_graph_benchmark "
                                   "does not: False in imported dirs)")
    test_min_size: int = Field(600, ge=16, description="INPUT.MIN_SIZE_TEST: short side after resizing")
    test_max_size: int = Field(1000, ge=16, description="INPUT.MAX_SIZE_TEST: long side cap")
    anchor_sizes: list[float] = Field([32, 64, 128, 256, 512], min_length=1, description="MODEL.RPN.ANCHOR_SIZES")
    anchor_ratios: list[float] = Field([0.5, 1.0, 2.0], min_length=1, description="MODEL.RPN.ASPECT_RATIOS")
    anchor_stride: Literal[16] = Field(16, description="MODEL.RPN.ANCHOR_STRIDE (C4: 16)")
    rpn_pre_nms_top_n: int = Field(6000, ge=1, description="MODEL.RPN.PRE_NMS_TOP_N_TEST, per image")
    rpn_post_nms_top_n: int = Field(300, ge=1, description="MODEL.RPN.POST_NMS_TOP_N_TEST: proposals per image")
    rpn_nms_iou: float = Field(0.7, ge=0, le=1, description="MODEL.RPN.NMS_THRESH")
    rpn_min_size: float = Field(0, ge=0, description="MODEL.RPN.MIN_SIZE (pixels, legacy +1 widths)")
    pooler_resolution: int = Field(14, ge=1, description="MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION")
    pooler_sampling_ratio: int = Field(0, ge=0, description="MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")
    box_coder_weights: list[float] = Field([10.0, 10.0, 5.0, 5.0], min_length=4, max_length=4,
                                           description="MODEL.ROI_HEADS.BBOX_REG_WEIGHTS")
    nms_filter: Literal["per_class", "best_class", "class_agnostic"] = Field(
        "best_class", description="MODEL.ROI_HEADS.NMS_FILTER 0 / 1 / 2: per-class NMS at nms_iou / per-class NMS "
        "at 0.3 then each box's best class (VinVL) / one NMS over each box's best class"
    )
    nms: Literal["torchvision", "legacy"] = Field(
        "torchvision", description="NMS op: torchvision (scene_graph_benchmark since June 2021) or legacy (its "
        "compiled op before: +1 box sizes, IoU >= threshold)"
    )
    nms_iou: float = Field(0.5, gt=0, le=1, description="MODEL.ROI_HEADS.NMS (per_class, class_agnostic)")
    score_threshold: float = Field(0.2, ge=0, le=1, description="MODEL.ROI_HEADS.SCORE_THRESH")
    min_boxes: int = Field(10, ge=0, description="MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG: best remaining fill up")
    max_boxes: int = Field(100, ge=1, description="MODEL.ROI_HEADS.DETECTIONS_PER_IMG")
    ignore_box_regression: bool = Field(True, description="TEST.IGNORE_BOX_REGRESSION: keep the proposal boxes")
    cls_embedding_dim: int = Field(256, ge=1, description="MODEL.ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM")
    attr_embedding_dim: int = Field(512, ge=1, description="MODEL.ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM")
    attr_score_threshold: float = Field(0.0, ge=0, le=1,
                                        description="MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD")
    max_attributes_per_box: int = Field(16, ge=1, description="MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ")
    max_attributes_per_image: int = Field(100, ge=0, description="MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG")
    autocast: Literal["none", "bf16", "fp16"] = Field(
        "none", description="torch.autocast dtype for the network (GPU throughput); none = fp32, the exact path"
    )
    given_boxes_featurizer: Literal["torchvision_c4", "pixel_crops"] = Field(
        "torchvision_c4", description="given_boxes backend: C4 box head on the boxes, or the pixel-crop featurizer"
    )
    detectron2_config: str | None = Field(None, description="detectron2 backend: its config YAML file")

    @model_validator(mode="after")
    def _consistent(self) -> "DetectorSection":
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes={self.min_boxes} exceeds max_boxes={self.max_boxes}")
        if self.model_dir and self.weights:
            raise ValueError("give either model_dir (an imported detector dir) or weights, not both")
        if self.backend == "detectron2":
            if importlib.util.find_spec("detectron2") is None:
                raise ValueError(DETECTRON2_INSTALL)
            if not self.detectron2_config or not self.weights:
                raise ValueError("backend detectron2 needs detectron2_config and weights")
        uses_c4 = self.backend == "torchvision_c4" or (
            self.backend == "given_boxes" and self.given_boxes_featurizer == "torchvision_c4"
        )
        if uses_c4 and self.weights is None and self.model_dir is None and not self.allow_random_weights:
            raise ValueError(
                "neither model_dir nor weights is set: import a detector with `mengzi-ray import-detector` and set "
                "model_dir, give a safetensors file (local or s3://), or set allow_random_weights: true for a "
                "random-init detector (tests and demos only: its features mean nothing)"
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
    block_bytes: int = Field(
        64 << 20, ge=1, description="decoded pixel bytes per block a decode task hands to the detector actors (a "
        "block is cut as soon as it reaches this, so 20 MP photos and thumbnails both give bounded blocks)"
    )
    decode_tasks_per_actor: float = Field(
        2.0, gt=0, description="read/decode tasks running at once per detector actor (of actors.max_size, rounded "
        "up): enough to keep each actor's next batch ready, without a burst of worker start-ups that slows the actors' own"
    )
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
    retry_failed: Literal["transient", "all", "none"] = Field(
        "transient", description="inputs in errors/ a re-run tries again: read failures (transient), all, or none"
    )
    feature_layout: Literal["nested", "packed", "packed_float16"] = Field(
        "nested", description="features column storage: nested lists of float32 (any Arrow tool sees floats), packed "
        "float32 bytes per image (reads at memory speed), or packed float16 (half the bytes; lossy, opt-in); every "
        "reader takes all three (features/layout.py)",
    )


class ExportOscarCard(Card):
    """`mengzi-ray export-oscar`: our feature dataset → VinVL TSV layout (features.tsv, predictions.tsv,
    imageid2idx.json, .lineidx files); streams in the driver process like the import."""

    dataset: str = Field(..., description="dataset dir holding features/ (local or s3://)")
    output: str = Field(..., min_length=1, description="dir (local or s3://) for the TSV files")
