"""The Faster R-CNN C4 network (torch modules only): ResNet/ResNeXt trunk to C4, RPN, ROIAlign, C5 box head.

Shape of VinVL's detector (oscar-formats.md §1.2): layers 1-3 of a ResNet/ResNeXt give the stride-16, 1024-channel
C4 map; the RPN proposes boxes on it; each proposal is ROIAligned to 14x14 and run through layer4 (the C5 stage,
stride 2 → 7x7, 2048 channels), average-pooled to the 2048-d region feature; linear heads give class scores, per-
class box deltas and (optionally) attribute scores. Built from torchvision parts; used by the torchvision_c4 and
given_boxes backends.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import roi_align

RESNET_LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
C4_STRIDE = 16
C4_CHANNELS = 1024
# The detector's input normalisation (RGB in [0, 1], ImageNet statistics): weights saved for this model assume it.
PIXEL_MEAN = [0.485, 0.456, 0.406]
PIXEL_STD = [0.229, 0.224, 0.225]
# Anchors of maskrcnn_benchmark's single-level C4 RPN: 5 sizes x 3 aspect ratios at stride 16.
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


class C4FasterRCNN(nn.Module):
    """Inference-only Faster R-CNN C4. Inputs and outputs are per image; call under torch.no_grad() in eval()."""

    def __init__(
        self,
        *,
        depth: int,
        groups: int,
        width_per_group: int,
        num_classes: int,
        num_attributes: int,
        min_size: int,
        max_size: int,
        rpn_pre_nms_top_n: int,
        rpn_post_nms_top_n: int,
        roi_resolution: int = 14,
    ) -> None:
        super().__init__()
        resnet = ResNet(Bottleneck, RESNET_LAYERS[depth], groups=groups, width_per_group=width_per_group)
        self.trunk = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3
        )
        self.box_head = resnet.layer4
        self.transform = GeneralizedRCNNTransform(min_size, max_size, PIXEL_MEAN, PIXEL_STD)
        anchors = AnchorGenerator(sizes=(ANCHOR_SIZES,), aspect_ratios=(ANCHOR_RATIOS,))
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(C4_CHANNELS, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_pre_nms_top_n, "testing": rpn_pre_nms_top_n},
            post_nms_top_n={"training": rpn_post_nms_top_n, "testing": rpn_post_nms_top_n},
            nms_thresh=0.7,
        )
        self.roi_resolution = roi_resolution
        self.cls_score = nn.Linear(2048, num_classes)
        self.bbox_pred = nn.Linear(2048, num_classes * 4)
        self.attr_score = nn.Linear(2048, num_attributes) if num_attributes > 0 else None

    def prepare(self, images: list[torch.Tensor]) -> tuple[ImageList, torch.Tensor, list[torch.Tensor]]:
        """images: (3, H, W) float in [0, 1] → (resized batch, C4 map (B, 1024, h, w), per-image (sx, sy) that
        map resized coordinates back to original pixels)."""
        device = self.cls_score.weight.device
        batch, _ = self.transform([img.to(device) for img in images])
        c4 = self.trunk(batch.tensors)
        scales = [
            torch.tensor([img.shape[2] / rw, img.shape[1] / rh], dtype=torch.float32)
            for img, (rh, rw) in zip(images, batch.image_sizes)
        ]
        return batch, c4, scales

    def propose(self, batch: ImageList, c4: torch.Tensor) -> list[torch.Tensor]:
        """RPN proposals per image, (P_i, 4) in resized coordinates, best objectness first."""
        proposals, _ = self.rpn(batch, {"0": c4})
        return proposals

    def region_features(self, c4: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """ROIAlign each image's boxes (resized coordinates) on C4, run the C5 head, average-pool → (sum P_i, 2048)."""
        pooled = roi_align(
            c4, [b.to(c4.dtype) for b in boxes], self.roi_resolution, spatial_scale=1.0 / C4_STRIDE, sampling_ratio=0
        )
        return self.box_head(pooled).mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(P, 2048) → class probabilities (P, C), box deltas (P, C, 4), attribute probabilities (P, A) or None."""
        probs = torch.softmax(self.cls_score(features), dim=-1)
        deltas = self.bbox_pred(features).reshape(len(features), -1, 4)
        attrs = torch.softmax(self.attr_score(features), dim=-1) if self.attr_score is not None else None
        return probs, deltas, attrs
