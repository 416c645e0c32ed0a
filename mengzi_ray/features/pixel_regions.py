"""A deterministic, training-free "given boxes" featurizer: pixels in a box → a 2048-d appearance vector.

It stands in for the detector's pooled ROI feature where no trained detector is wanted (the synthetic set, tests,
the demo). The vector is built only from the pixels of the box (plus a thin ring around it to estimate the
background), so shape and colour of the object in the box can be read back from it. Layout (values in [0, 1]
except the xy moment, in [-0.25, 0.25]):

| dims         | content                                                                                  |
|--------------|------------------------------------------------------------------------------------------|
| [0, 768)     | the box crop area-resized to 16x16 RGB, row-major (y, x, channel)                        |
| [768, 1024)  | 16x16 foreground mask: fraction of pixels per cell that differ from the background colour |
| [1024, 1280) | 16x16 gradient magnitude of the grayscale crop (edges)                                   |
| [1280, 1304) | colour histogram of all box pixels: 8 bins per channel, R then G then B, each sums to 1   |
| [1304, 1328) | the same histogram over foreground pixels only (zeros where the box has no foreground)    |
| [1328, 1340) | foreground fraction, foreground mean RGB, background mean RGB, foreground centroid (x, y) |
|              | and second moments (xx, yy, xy), both relative to the box                                 |
| [1340, 2048) | zero padding, so the vector has the 2048 dims of Oscar's pooled detector feature          |
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mengzi_ray.features.schema import APPEARANCE_DIM

PIXEL_DETECTOR_NAME = "pixel_crops_v1"

GRID = 16
HIST_BINS = 8
_RGB_END = GRID * GRID * 3  # 768
_MASK_END = _RGB_END + GRID * GRID  # 1024
_EDGE_END = _MASK_END + GRID * GRID  # 1280
_HIST_END = _EDGE_END + 3 * HIST_BINS  # 1304
_FG_HIST_END = _HIST_END + 3 * HIST_BINS  # 1328
_SUMMARY_END = _FG_HIST_END + 12  # 1340
USED_DIM = _SUMMARY_END

# A pixel is foreground when its RGB distance from the background colour, scaled to [0, 1], exceeds this;
# well above mild sensor noise (~0.02) and well below the distance of any saturated colour from a light background.
_FOREGROUND_THRESHOLD = 0.12


def _as_float_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image, or an (H, W), (H, W, 3) or (H, W, 4) uint8 array / float array in [0, 1] → (H, W, 3) float32."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _pool(plane: np.ndarray, size: int) -> np.ndarray:
    """Area-average (H, W) float32 → (size, size); a crop smaller than the grid is repeated instead."""
    resized = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BOX
    )
    return np.asarray(resized, dtype=np.float32)


def _histogram(pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-channel weighted histograms of (P, 3) values in [0, 1] → (3 * HIST_BINS,), each channel summing to 1."""
    total = float(weights.sum())
    if total <= 0.0:
        return np.zeros(3 * HIST_BINS, dtype=np.float32)
    bins = np.minimum((pixels * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    hist = np.stack([np.bincount(bins[:, c], weights=weights, minlength=HIST_BINS) for c in range(3)])
    return (hist / total).astype(np.float32).reshape(-1)


def _background_colour(rgb: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """Median colour of a ring just outside the box; the crop's own border where the box fills the image."""
    height, width = rgb.shape[:2]
    margin = max(2, round(0.1 * max(x2 - x1, y2 - y1)))
    ox1, oy1 = max(0, x1 - margin), max(0, y1 - margin)
    ox2, oy2 = min(width, x2 + margin), min(height, y2 + margin)
    outer = rgb[oy1:oy2, ox1:ox2]
    ring = np.ones(outer.shape[:2], dtype=bool)
    ring[y1 - oy1 : y2 - oy1, x1 - ox1 : x2 - ox1] = False
    if ring.any():
        return np.median(outer[ring], axis=0)
    crop = rgb[y1:y2, x1:x2]
    border = np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])
    return np.median(border, axis=0)


def _box_vector(rgb: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """The APPEARANCE_DIM vector of one non-empty, in-image integer box (pixel columns x1..x2-1, rows y1..y2-1)."""
    crop = rgb[y1:y2, x1:x2]
    background = _background_colour(rgb, x1, y1, x2, y2)
    distance = np.linalg.norm(crop - background, axis=-1) / np.sqrt(3.0)
    mask = (distance > _FOREGROUND_THRESHOLD).astype(np.float32)

    gray = _pool(crop.mean(axis=-1), 2 * GRID)
    gy, gx = np.gradient(gray)
    edges = np.sqrt(gx * gx + gy * gy).reshape(GRID, 2, GRID, 2).mean(axis=(1, 3))

    pixels = crop.reshape(-1, 3)
    flat_mask = mask.reshape(-1)
    fg_total = float(flat_mask.sum())
    fg_fraction = fg_total / flat_mask.size
    if fg_total > 0:
        fg_mean = (pixels * flat_mask[:, None]).sum(axis=0) / fg_total
        ys, xs = np.nonzero(mask)
        # Pixel centres relative to the box, so the moments describe the shape independent of box size.
        xs = (xs + 0.5) / mask.shape[1]
        ys = (ys + 0.5) / mask.shape[0]
        cx, cy = xs.mean(), ys.mean()
        moments = [((xs - cx) ** 2).mean(), ((ys - cy) ** 2).mean(), ((xs - cx) * (ys - cy)).mean()]
    else:
        fg_mean = np.zeros(3)
        cx = cy = 0.0
        moments = [0.0, 0.0, 0.0]
    summary = np.array([fg_fraction, *fg_mean, *background, cx, cy, *moments], dtype=np.float32)

    out = np.zeros(APPEARANCE_DIM, dtype=np.float32)
    out[:_RGB_END] = np.stack([_pool(crop[:, :, c], GRID) for c in range(3)], axis=-1).reshape(-1)
    out[_RGB_END:_MASK_END] = _pool(mask, GRID).reshape(-1)
    out[_MASK_END:_EDGE_END] = np.clip(edges, 0.0, 1.0).reshape(-1)
    out[_EDGE_END:_HIST_END] = _histogram(pixels, np.ones(len(pixels)))
    out[_HIST_END:_FG_HIST_END] = _histogram(pixels, flat_mask)
    out[_FG_HIST_END:_SUMMARY_END] = summary
    return out


def pixel_region_features(image: Image.Image | np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Appearance vectors for given boxes, computed from the pixels alone (no model, no randomness).

    image: a PIL image (any mode, converted to RGB) or an (H, W[, 3|4]) uint8 array / float array in [0, 1].
    boxes: (N, 4) x1, y1, x2, y2 in pixel-edge coordinates of that image (x2, y2 exclusive: the box (0, 0, W, H)
        is the whole image). Boxes are clipped to the image and widened outward to whole pixels; a box that is
        empty after clipping (or not finite) yields an all-zero row.
    Returns (N, 2048) float32 laid out as in the module docstring.
    """
    rgb = _as_float_rgb(image)
    height, width = rgb.shape[:2]
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(b), APPEARANCE_DIM), dtype=np.float32)
    for i, (bx1, by1, bx2, by2) in enumerate(b):
        if not np.all(np.isfinite([bx1, by1, bx2, by2])):
            continue
        cx1, cx2 = np.clip([bx1, bx2], 0, width)
        cy1, cy2 = np.clip([by1, by2], 0, height)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        out[i] = _box_vector(rgb, int(np.floor(cx1)), int(np.floor(cy1)), int(np.ceil(cx2)), int(np.ceil(cy2)))
    return out
