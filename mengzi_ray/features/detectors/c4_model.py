"""The Faster R-CNN C4 network of VinVL's detector (torch modules only; box arithmetic is in rcnn_ops).

The layout of microsoft/scene_graph_benchmark's AttrRCNN with a ResNet/ResNeXt C4 backbone
(maskrcnn_benchmark/modeling/backbone/resnet.py, rpn/rpn.py, roi_heads/box_head, scene_graph_benchmark/
attribute_head): stem + layers 1-3 give the stride-16 C4 map; a 3x3 conv RPN head scores anchors on it; each box
is ROIAligned (legacy, aligned=False) to a square grid and run through layer4 (the C5 head, first stride 2),
average-pooled to the region feature (2048-d for res2_out_channels 256); linear heads give class logits, per-class
box deltas and, conditioned on a class embedding, attribute logits. Batch norms are frozen (an affine map from the
stored statistics, no epsilon). Parameter names follow the original's with its prefixes shortened, so converting a
released checkpoint is a fixed renaming (features/detector_import.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from mengzi_ray.features.detectors.rcnn_ops import cell_anchors

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class FrozenBatchNorm2d(nn.Module):
    """maskrcnn_benchmark layers/batch_norm.py: y = x * w / sqrt(var) + (b - mean * w / sqrt(var)), no epsilon."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * self.running_var.rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Bottleneck(nn.Module):
    """A ResNe(X)t bottleneck; `stride_in_1x1` puts the stride on conv1 (MSRA) instead of conv2 (ResNeXt)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, groups: int, stride_in_1x1: bool, stride: int) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), FrozenBatchNorm2d(out_ch))
            if in_ch != out_ch else None
        )
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, stride=s1, bias=False)
        self.bn1 = FrozenBatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=s3, padding=1, groups=groups, bias=False)
        self.bn2 = FrozenBatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


def _stage(index: int, blocks: int, in_ch: int, groups: int, width: int, res2_out: int, stride_in_1x1: bool,
           ) -> nn.Sequential:
    """ResNet stage `index` (1 = res2 ... 4 = res5): first block strided unless it is res2."""
    factor = 2 ** (index - 1)
    mid, out = groups * width * factor, res2_out * factor
    first_stride = 1 if index == 1 else 2
    return nn.Sequential(*[
        Bottleneck(in_ch if i == 0 else out, mid, out, groups, stride_in_1x1, first_stride if i == 0 else 1)
        for i in range(blocks)
    ])


class Stem(nn.Module):
    """7x7/2 conv, frozen BN, ReLU, 3x3/2 max pool (padding 1)."""

    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_ch, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)


class Trunk(nn.Module):
    """Stem + res2..res4 → the C4 map (B, 4 * res2_out_channels, H/16, W/16)."""

    def __init__(self, depth: int, groups: int, width: int, stride_in_1x1: bool, stem_out: int, res2_out: int) -> None:
        super().__init__()
        blocks = RESNET_BLOCKS[depth]
        self.stem = Stem(stem_out)
        self.layer1 = _stage(1, blocks[0], stem_out, groups, width, res2_out, stride_in_1x1)
        self.layer2 = _stage(2, blocks[1], res2_out, groups, width, res2_out, stride_in_1x1)
        self.layer3 = _stage(3, blocks[2], res2_out * 2, groups, width, res2_out, stride_in_1x1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness logits (A per cell) and box deltas (4A per cell)."""

    def __init__(self, channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(c4))
        return self.cls_logits(t), self.bbox_pred(t)


class AttributeHead(nn.Module):
    """AttributeRCNNPredictor: [pooled feature, class embedding] → ReLU(fc_attr) → attribute logits."""

    def __init__(self, feature_dim: int, num_classes: int, num_attributes: int, cls_dim: int, attr_dim: int) -> None:
        super().__init__()
        self.cls_embedding = nn.Embedding(num_classes, cls_dim)
        self.fc_attr = nn.Linear(feature_dim + cls_dim, attr_dim)
        self.attr_score = nn.Linear(attr_dim, num_attributes)

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pooled, self.cls_embedding(labels)], dim=1)
        return self.attr_score(F.relu(self.fc_attr(x)))


class C4FasterRCNN(nn.Module):
    """Inference-only AttrRCNN C4. Call under torch.no_grad() in eval(); the detector backend drives the steps.

    Construct with plain arguments (the detector card section maps onto them in torchvision_c4.load_c4).
    """

    def __init__(
        self,
        *,
        depth: int,
        groups: int,
        width_per_group: int,
        stride_in_1x1: bool,
        num_classes: int,
        num_attributes: int = 0,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_stride: int = 16,
        pooler_resolution: int = 14,
        pooler_sampling_ratio: int = 0,
        cls_embedding_dim: int = 256,
        attr_embedding_dim: int = 512,
    ) -> None:
        super().__init__()
        c4_channels, feature_dim = res2_out_channels * 4, res2_out_channels * 8
        self.trunk = Trunk(depth, groups, width_per_group, stride_in_1x1, stem_out_channels, res2_out_channels)
        self.register_buffer("cell_anchors", cell_anchors(anchor_stride, anchor_sizes, anchor_ratios),
                             persistent=False)
        self.anchor_stride = anchor_stride
        self.rpn = RPNHead(c4_channels, len(self.cell_anchors))
        self.head = _stage(4, RESNET_BLOCKS[depth][3], c4_channels, groups, width_per_group, res2_out_channels,
                           stride_in_1x1)
        self.pooler_resolution = pooler_resolution
        self.pooler_sampling_ratio = pooler_sampling_ratio
        self.cls_score = nn.Linear(feature_dim, num_classes)
        self.bbox_pred = nn.Linear(feature_dim, num_classes * 4)
        self.attribute = (
            AttributeHead(feature_dim, num_classes, num_attributes, cls_embedding_dim, attr_embedding_dim)
            if num_attributes > 0 else None
        )
        self.feature_dim = feature_dim

    def rpn_outputs(self, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C4 map → objectness logits (B, A, h, w) and deltas (B, 4A, h, w)."""
        return self.rpn(c4)

    def pooled_features(self, c4: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Boxes per image, (P_i, 4) in resized pixels → C5 head, average-pooled → (sum P_i, feature_dim).

        The legacy ROIAlign (torchvision's roi_align with aligned=False equals maskrcnn_benchmark's ROIAlign op).
        """
        rois = torch.cat([
            torch.cat([torch.full((len(b), 1), float(i), dtype=c4.dtype, device=c4.device), b.to(c4.dtype)], dim=1)
            for i, b in enumerate(boxes)
        ])
        grid = roi_align(c4, rois, self.pooler_resolution, spatial_scale=1.0 / self.anchor_stride,
                         sampling_ratio=self.pooler_sampling_ratio, aligned=False)
        return self.head(grid).mean(dim=(2, 3))

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, feature_dim) → class probabilities (P, C) and box deltas (P, 4C)."""
        return torch.softmax(self.cls_score(pooled), dim=-1), self.bbox_pred(pooled)

    def attribute_probs(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(D, feature_dim) features of the detections and their class ids (D,) → attribute softmax (D, A)."""
        if self.attribute is None:
            raise ValueError("this detector has no attribute head")
        return torch.softmax(self.attribute(pooled, labels), dim=-1)
