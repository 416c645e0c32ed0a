"""The region-feature and error tables (docs/data-contracts.md) and the Oscar 2054-d region vector.

Every producer of region features (the synthetic set, the extraction job, the Oscar TSV import) builds its rows
through :func:`feature_row` and writes them with :data:`FEATURES_SCHEMA`, so all feature datasets are readable by
plain pyarrow/pandas and interchangeable downstream.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

APPEARANCE_DIM = 2048
GEOMETRY_DIM = 6
REGION_DIM = APPEARANCE_DIM + GEOMETRY_DIM  # 2054, Oscar's img_feature_dim

FEATURES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("features", pa.list_(pa.list_(pa.float32(), REGION_DIM))),
        ("scores", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.string())),
        ("tags", pa.list_(pa.string())),
        ("attributes", pa.list_(pa.string())),
        ("detector", pa.string()),
        # every attribute the detector's attribute head kept per box, best first, and their scores
        ("attribute_lists", pa.list_(pa.list_(pa.string()))),
        ("attribute_scores", pa.list_(pa.list_(pa.float32()))),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("image_id", pa.string()),
        ("stage", pa.string()),  # read | decode | detect | write
        ("error", pa.string()),
        ("job_id", pa.string()),
        ("transient", pa.bool_()),  # a read/storage failure a re-run retries (card retry_failed: transient)
    ]
)


def box_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Oscar's 6 box numbers per region: [x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H].

    boxes: (N, 4) x1,y1,x2,y2 in original-image pixels. Returns (N, 6) float32 (microsoft/Oscar issues #10, #33).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width} height={height}")
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w, h = float(width), float(height)
    return np.stack(
        [b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h],
        axis=1,
    ).astype(np.float32)


def region_vectors(appearance: np.ndarray, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Concatenate appearance (N, 2048) and box geometry (N, 6), appearance first → (N, 2054) float32."""
    a = np.asarray(appearance, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != APPEARANCE_DIM:
        raise ValueError(f"appearance features must be (N, {APPEARANCE_DIM}), got {a.shape}")
    g = box_geometry(boxes, width, height)
    if g.shape[0] != a.shape[0]:
        raise ValueError(f"{a.shape[0]} appearance rows but {g.shape[0]} boxes")
    return np.concatenate([a, g], axis=1)


def feature_row(
    *,
    image_id: str,
    source: str,
    width: int,
    height: int,
    boxes: np.ndarray,
    appearance: np.ndarray,
    scores: Sequence[float],
    labels: Sequence[str],
    tags: Sequence[str],
    detector: str,
    attributes: Sequence[str] | None = None,
    attribute_lists: Sequence[Sequence[str]] | None = None,
    attribute_scores: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """One row of FEATURES_SCHEMA as plain Python lists (what pyarrow and Ray Data both accept); the attribute
    columns are empty lists where the detector has no attribute head."""
    n = len(labels)
    if not (len(boxes) == len(appearance) == len(scores) == len(tags) == n):
        raise ValueError(
            f"{image_id}: per-region columns disagree: boxes={len(boxes)} features={len(appearance)} "
            f"scores={len(scores)} labels={n} tags={len(tags)}"
        )
    return {
        "image_id": image_id,
        "source": source,
        "width": int(width),
        "height": int(height),
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4).tolist(),
        "features": region_vectors(appearance, boxes, width, height).tolist(),
        "scores": [float(s) for s in scores],
        "labels": list(labels),
        "tags": list(tags),
        "attributes": list(attributes) if attributes is not None else [],
        "detector": detector,
        "attribute_lists": [list(a) for a in attribute_lists] if attribute_lists is not None else [],
        "attribute_scores": [[float(v) for v in a] for a in attribute_scores] if attribute_scores is not None else [],
    }


def region_matrix(features_column_value: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """A row's `features` cell → (N, 2054) float32 (zero rows → shape (0, 2054))."""
    arr = np.asarray(features_column_value, dtype=np.float32)
    return arr.reshape(-1, REGION_DIM)


def region_arrays(features_column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """A `features` column → one (N_i, D) float32 array per row, as views of the Arrow buffers (no Python floats);
    D is the column's fixed list size (2054 for Oscar regions; smaller in tiny test models).

    The fast path for readers of many rows (training loaders, benchmarks); region_matrix is the per-cell version.
    The arrays are read-only views: copy before writing into them.
    """
    chunks = features_column.chunks if isinstance(features_column, pa.ChunkedArray) else [features_column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        offsets = chunk.offsets.to_numpy()  # region offsets per row (list level), honours slicing
        regions = chunk.values  # fixed_size_list<float32, D>
        dim = regions.type.list_size
        values = regions.values.to_numpy(zero_copy_only=False)
        base = regions.offset * dim
        matrix = values[base : base + len(regions) * dim].reshape(-1, dim)
        out.extend(matrix[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return out
