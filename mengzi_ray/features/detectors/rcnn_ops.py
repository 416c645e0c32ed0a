"""The box arithmetic of maskrcnn_benchmark's Faster R-CNN inference, as plain tensor functions.

Each function restates one step of microsoft/scene_graph_benchmark (the maskrcnn_benchmark fork VinVL's features
come from) so that :mod:`torchvision_c4` reproduces its numbers; the function docstrings name the original. The
conventions are Detectron's legacy ones: a box x1..x2 covers ``x2 - x1 + 1`` pixels, clipping keeps coordinates
within ``[0, W - 1]``. Boxes are (N, 4) x1, y1, x2, y2 float tensors in the resized image's pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torchvision.ops import nms as torchvision_nms

NmsKind = Literal["torchvision", "legacy"]
# filter_results_peter hard-codes its per-class IoU (box_head/inference.py), whatever MODEL.ROI_HEADS.NMS says.
BEST_CLASS_NMS_IOU = 0.3
# BoxCoder's default bbox_xform_clip: no predicted log-scale above log(1000 / 16).
BOX_XFORM_CLIP = math.log(1000.0 / 16)


def cell_anchors(stride: int, sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """The (len(ratios) * len(sizes), 4) anchors of one feature-map cell, ratio-major.

    rpn/anchor_generator.py generate_anchors: a (0, 0, stride-1, stride-1) window, widths rounded per aspect
    ratio, then scaled by size / stride, all in float64 before the float32 cast.
    """
    base = np.array([0.0, 0.0, stride - 1.0, stride - 1.0])
    w, h = base[2] - base[0] + 1, base[3] - base[1] + 1
    cx, cy = base[0] + 0.5 * (w - 1), base[1] + 0.5 * (h - 1)
    ratios_arr = np.asarray(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios_arr))
    hs = np.round(ws * ratios_arr)
    scales = np.asarray(sizes, dtype=np.float64) / stride
    rows = []
    for rw, rh in zip(ws, hs):
        # each ratio window is re-centred from its own rounded extent, as _scale_enum recomputes it
        x1, y1 = cx - 0.5 * (rw - 1), cy - 0.5 * (rh - 1)
        x2, y2 = cx + 0.5 * (rw - 1), cy + 0.5 * (rh - 1)
        ww, hh = x2 - x1 + 1, y2 - y1 + 1
        ccx, ccy = x1 + 0.5 * (ww - 1), y1 + 0.5 * (hh - 1)
        sw, sh = ww * scales, hh * scales
        rows.append(np.stack([ccx - 0.5 * (sw - 1), ccy - 0.5 * (sh - 1), ccx + 0.5 * (sw - 1),
                              ccy + 0.5 * (sh - 1)], axis=1))
    return torch.from_numpy(np.vstack(rows)).float()


def grid_anchors(cells: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """Anchors of an (height, width) feature map → (height * width * A, 4), position-major (AnchorGenerator)."""
    shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=cells.device)
    shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=cells.device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    return (shifts.view(-1, 1, 4) + cells.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """box_coder.py BoxCoder.decode: deltas (N, 4k) relative to boxes (N, 4) → (N, 4k) boxes, legacy +1 sizes."""
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=BOX_XFORM_CLIP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=BOX_XFORM_CLIP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.zeros_like(deltas)
    out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    out[:, 2::4] = pred_ctr_x + 0.5 * pred_w - 1
    out[:, 3::4] = pred_ctr_y + 0.5 * pred_h - 1
    return out


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """BoxList.clip_to_image(remove_empty=False): every coordinate into [0, W-1] / [0, H-1] (a new tensor)."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(min=0, max=width - 1)
    out[:, 1::2] = out[:, 1::2].clamp(min=0, max=height - 1)
    return out


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float, kind: NmsKind) -> torch.Tensor:
    """Indices kept by greedy NMS. `kind` picks one of the two ops scene_graph_benchmark has called:

    - ``torchvision``: ``torchvision.ops.nms`` (layers/nms.py since commit 462a68f, June 2021): areas
      ``(x2-x1)*(y2-y1)``, suppress when IoU > iou, kept indices by descending score.
    - ``legacy``: the compiled CPU op before 462a68f (csrc/cpu/nms_cpu.cpp): areas and overlaps with ``+1``,
      suppress when IoU >= iou, kept indices in ascending index order. It equals torchvision's op on boxes whose
      x2, y2 are shifted by +1 (same areas and overlaps) with the threshold moved just below the float32 ``iou``.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if kind == "torchvision":
        return torchvision_nms(boxes, scores, iou)
    shifted = boxes.clone()
    shifted[:, 2:] += 1
    below = float(np.nextafter(np.float64(np.float32(iou)), -np.inf))
    return torch.sort(torchvision_nms(shifted, scores, below)).values


def rpn_proposals(
    anchors: torch.Tensor,
    objectness: torch.Tensor,
    deltas: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_iou: float,
    min_size: float,
    nms_kind: NmsKind,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """rpn/inference.py RPNPostProcessor for one feature level (C4), at test time.

    anchors: (H*W*A, 4) over the padded batch's feature map; objectness: (N, A, H, W) logits; deltas:
    (N, A*4, H, W). Per image: the top `pre_nms_top_n` anchors by sigmoid objectness (over the whole padded map),
    decoded with unit weights, clipped to that image's (height, width), boxes narrower than `min_size` dropped,
    NMS at `nms_iou`, the first `post_nms_top_n` kept. Returns per image (boxes (P, 4), objectness (P,)).
    """
    n, a, h, w = objectness.shape
    scores = objectness.permute(0, 2, 3, 1).reshape(n, -1).sigmoid()
    regression = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    top_n = min(pre_nms_top_n, scores.shape[1])
    scores, top_idx = scores.topk(top_n, dim=1, sorted=True)
    batch_idx = torch.arange(n, device=scores.device)[:, None]
    regression = regression[batch_idx, top_idx]
    chosen = anchors.reshape(1, -1, 4).expand(n, -1, -1)[batch_idx, top_idx]
    boxes = decode_boxes(regression.reshape(-1, 4), chosen.reshape(-1, 4), (1.0, 1.0, 1.0, 1.0)).view(n, -1, 4)
    out = []
    for i, (height, width) in enumerate(image_sizes):
        b = clip_boxes(boxes[i], height, width)
        keep = ((b[:, 2] - b[:, 0] + 1 >= min_size) & (b[:, 3] - b[:, 1] + 1 >= min_size)).nonzero().squeeze(1)
        b, s = b[keep], scores[i][keep]
        if nms_iou > 0:
            kept = nms(b, s, nms_iou, nms_kind)[:post_nms_top_n]
            b, s = b[kept], s[kept]
        out.append((b, s))
    return out


def select_best_class(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    *,
    score_threshold: float,
    min_detections: int,
    max_detections: int,
    nms_kind: NmsKind,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """box_head/inference.py filter_results_peter (NMS_FILTER 1, VinVL's extraction).

    probs: (P, C) softmax, background at 0; boxes: (P, C, 4) per-class boxes. Per foreground class, NMS at IoU
    0.3 over all P boxes; each proposal keeps the best class that survived; best first, the boxes scoring >=
    score_threshold, but at least `min_detections` (best remaining fill up) and at most `max_detections`.
    Returns (proposal indices, class indices, scores).
    """
    mask = torch.zeros_like(probs)
    for j in range(1, probs.shape[1]):
        mask[nms(boxes[:, j], probs[:, j], BEST_CLASS_NMS_IOU, nms_kind), j] = 1
    best, labels = (mask * probs).max(1)
    inds = best.nonzero().squeeze(1)
    labels, best = labels[inds], best[inds]
    order = torch.sort(best, dim=0, descending=True).indices
    passing = int((best >= score_threshold).sum())
    if passing < min_detections:
        keep = order[:min_detections]
    elif passing > max_detections:
        keep = order[:max_detections]
    else:
        keep = order[:passing]
    return inds[keep], labels[keep], best[keep]


def select_per_class(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    nms_kind: NmsKind,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """box_head/inference.py filter_results (NMS_FILTER 0): per class, the boxes scoring > score_threshold, NMS at
    `nms_iou`; a proposal may appear once per class. Class-major order; above `max_detections`, the boxes scoring
    at least the max_detections-th best score (kthvalue, so ties may keep more). Returns as select_best_class."""
    inds_all = probs > score_threshold
    idx_parts, cls_parts, score_parts = [], [], []
    for j in range(1, probs.shape[1]):
        inds = inds_all[:, j].nonzero().squeeze(1)
        if len(inds) == 0:
            continue
        kept = inds[nms(boxes[inds, j], probs[inds, j], nms_iou, nms_kind)]
        idx_parts.append(kept)
        cls_parts.append(torch.full((len(kept),), j, dtype=torch.long, device=probs.device))
        score_parts.append(probs[kept, j])
    if not idx_parts:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return empty, empty, probs.new_zeros(0)
    idx, cls, scores = torch.cat(idx_parts), torch.cat(cls_parts), torch.cat(score_parts)
    if len(scores) > max_detections > 0:
        threshold, _ = torch.kthvalue(scores.cpu(), len(scores) - max_detections + 1)
        keep = (scores >= threshold.item()).nonzero().squeeze(1)
        idx, cls, scores = idx[keep], cls[keep], scores[keep]
    return idx, cls, scores


def select_class_agnostic(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    *,
    score_threshold: float,
    nms_iou: float,
    min_detections: int,
    max_detections: int,
    nms_kind: NmsKind,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """box_head/inference.py filter_results_fast (NMS_FILTER 2): each proposal's best foreground class, one NMS over
    all of them (boxes: (P, 4)), candidates above score_threshold / 100; best first, between min and max kept."""
    scores, labels = probs[:, 1:].max(1)
    labels = labels + 1
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    candidates = ((ws >= 0) & (hs >= 0) & (scores > score_threshold * 0.01)).nonzero().squeeze(1)
    kept = candidates[nms(boxes[candidates], scores[candidates], nms_iou, nms_kind)]
    order = kept[torch.sort(scores[kept], dim=0, descending=True).indices]
    passing = int((scores[kept] >= score_threshold).sum())
    count = min(max(passing, min_detections), max_detections)
    keep = order[:count]
    return keep, labels[keep], scores[keep]


def select_attributes(
    probs: torch.Tensor, *, threshold: float, max_per_image: int, max_per_box: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """attribute_head/inference.py AttributePostProcessor.filter_results for one image.

    probs: (D, A) softmax over attributes, index 0 = "no attribute". Index 0 and scores <= threshold are zeroed;
    above `max_per_image` non-zero scores, those below the image's max_per_image-th best are zeroed; then the top
    `max_per_box` per box. Returns (labels (D, k), scores (D, k)); a zero score means "no attribute" in that slot.
    """
    scores = probs.clone()
    scores[:, 0] = 0.0
    passing = scores > threshold
    count = int(passing.sum())
    scores[~passing] = 0.0
    if count > max_per_image > 0:
        cut, _ = torch.kthvalue(scores.flatten().cpu(), count - max_per_image + 1)
        scores[scores < cut.item()] = 0.0
    top_scores, top_labels = torch.topk(scores, min(max_per_box, scores.shape[1]), dim=1)
    return top_labels, top_scores
