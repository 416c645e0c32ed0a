"""A deterministic synthetic Chinese image-caption set: coloured shapes on a light background (docs/data-contracts.md §5).

Each scene holds 1–3 non-overlapping objects, each a distinct (colour, shape) pair. Multi-object scenes lay their
objects out in a row or a column so that 左边/右边/上面/下面 are unambiguous, and every caption is a function of
colours, shapes and positions — a captioner has to read the regions to beat the caption prior, and a retriever
has to tell scenes apart by exactly those properties.

On disk (`write_synthetic_dataset`), in the contracts of docs/data-contracts.md:
  images/{train,val}/<NNNNNN>.png   the scenes; image_id = "train/000012" (path under images/, no extension)
  features/part-0.parquet           FEATURES_SCHEMA, one row per image, pixel features over the true boxes
  text.jsonl                        {"image_id", "text", "kind": "caption", "split"}, 3 captions per image
  boxes.jsonl                       {"uri", "image_id", "boxes", "labels"}: the manifest for given-box extraction
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from mengzi_ray.features.pixel_regions import PIXEL_DETECTOR_NAME, pixel_region_features
from mengzi_ray.features.schema import FEATURES_SCHEMA, feature_row

COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 40, 40),
    "蓝色": (40, 80, 220),
    "绿色": (40, 170, 60),
    "黄色": (235, 200, 30),
    "紫色": (150, 60, 190),
}
# Chinese tag → English detector-style label.
SHAPES: dict[str, str] = {"圆形": "circle", "正方形": "square", "三角形": "triangle"}
SPLITS = ("train", "val")
CAPTIONS_PER_IMAGE = 3

_COMBOS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
_OBJECT_COUNT_P = (0.3, 0.4, 0.3)  # 1, 2, 3 objects
_NOISE_STD = 3.0  # pixel noise, in 0..255 units


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. box: x1, y1, x2, y2 in pixel-edge coordinates, x2/y2 exclusive (it covers columns x1..x2-1)."""

    colour: str  # a key of COLOURS
    shape: str  # a key of SHAPES (the Chinese tag)
    box: tuple[float, float, float, float]

    @property
    def label(self) -> str:
        """The English detector-style class name."""
        return SHAPES[self.shape]

    @property
    def phrase(self) -> str:
        """「红色的圆形」."""
        return f"{self.colour}的{self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(frozen=True)
class Scene:
    """A rendered scene: RGB image (size x size), its objects in layout order (left→right or top→bottom), and
    CAPTIONS_PER_IMAGE distinct Chinese captions."""

    image: Image.Image
    objects: list[SceneObject]
    captions: list[str]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 boxes in object order."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.objects]

    @property
    def tags(self) -> list[str]:
        return [o.shape for o in self.objects]


@dataclass(frozen=True)
class SyntheticDataset:
    """Where `write_synthetic_dataset` put things, and how many."""

    root: Path
    images_dir: Path
    features_path: Path
    text_path: Path
    boxes_path: Path
    num_train: int
    num_val: int
    num_captions: int


def _layout(rng: np.random.Generator, count: int, size: int) -> tuple[list[tuple[int, int, int]], str | None]:
    """Square placements (x1, y1, side) in layout order, and the axis ("row" | "column"; None for one object).

    Several objects each get an equal slot along the axis with a 1-pixel gap at both slot ends, and share a
    jittered common line across it, so the along-axis order is the visible order.
    """
    if count == 1:
        side = int(rng.integers(round(0.25 * size), round(0.4 * size) + 1))
        x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        return [(x1, y1, side)], None
    axis = "row" if rng.random() < 0.5 else "column"
    slot = size / count
    side_min, side_max = round(0.2 * size), int(min(0.3 * size, slot - 4))
    line = rng.uniform(0.35, 0.65) * size
    placements = []
    for i in range(count):
        side = int(rng.integers(side_min, side_max + 1))
        along = int(i * slot + 1 + rng.uniform(0, slot - side - 2))
        across = int(np.clip(round(line + rng.uniform(-0.1, 0.1) * size - side / 2), 0, size - side))
        placements.append((along, across, side) if axis == "row" else (across, along, side))
    return placements, axis


def _draw(draw: ImageDraw.ImageDraw, shape: str, x1: int, y1: int, side: int, rgb: tuple[int, int, int]) -> None:
    """Fill exactly the pixels of `shape` inside columns x1..x1+side-1, rows y1..y1+side-1, touching all 4 edges."""
    x2, y2 = x1 + side - 1, y1 + side - 1
    if shape == "圆形":
        draw.ellipse([x1, y1, x2, y2], fill=rgb)
    elif shape == "正方形":
        draw.rectangle([x1, y1, x2, y2], fill=rgb)
    else:
        draw.polygon([(x1 + (side - 1) / 2, y1), (x1, y2), (x2, y2)], fill=rgb)


def _position_word(obj: SceneObject, size: int) -> str:
    """Where a lone object sits in the picture: 中间 near the centre, else the dominant offset's direction."""
    cx, cy = obj.centre
    dx, dy = cx / size - 0.5, cy / size - 0.5
    if max(abs(dx), abs(dy)) < 0.15:
        return "中间"
    if abs(dx) >= abs(dy):
        return "左边" if dx < 0 else "右边"
    return "上面" if dy < 0 else "下面"


def _captions(objects: list[SceneObject], axis: str | None, size: int) -> list[str]:
    """CAPTIONS_PER_IMAGE distinct captions of at most 20 characters; objects are in layout order."""
    if axis is None:
        (obj,) = objects
        where = _position_word(obj, size)
        return [f"一个{obj.phrase}", f"图片{where}有一个{obj.phrase}", f"{obj.phrase}在图片{where}"]
    before, after = ("左边", "右边") if axis == "row" else ("上面", "下面")
    if len(objects) == 2:
        a, b = objects
        return [
            f"{a.phrase}在{b.phrase}{before}",
            f"{b.phrase}在{a.phrase}{after}",
            f"图中有一个{a.phrase}和一个{b.phrase}",
        ]
    a, b, c = objects
    # The 的-less list keeps three objects within 20 characters.
    listing = f"图中有{a.colour}{a.shape}、{b.colour}{b.shape}和{c.colour}{c.shape}"
    return [f"{a.phrase}在{b.phrase}{before}", f"{c.phrase}在{b.phrase}{after}", listing]


def generate_scene(rng: np.random.Generator, size: int = 96) -> Scene:
    """Render one random scene of size x size pixels; the same generator state gives the same scene.

    1–3 objects, pairwise distinct (colour, shape), side 20–40 % of the image, on a light tinted background with
    mild Gaussian pixel noise (std 3 of 255).
    """
    if size < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {size}")
    count = int(rng.choice(len(_OBJECT_COUNT_P), p=_OBJECT_COUNT_P)) + 1
    combos = [_COMBOS[i] for i in rng.choice(len(_COMBOS), size=count, replace=False)]
    placements, axis = _layout(rng, count, size)

    background = tuple(int(v) for v in rng.integers(228, 251, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for (colour, shape), (x1, y1, side) in zip(combos, placements):
        _draw(draw, shape, x1, y1, side, COLOURS[colour])
        objects.append(SceneObject(colour, shape, (float(x1), float(y1), float(x1 + side), float(y1 + side))))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, _NOISE_STD, size=(size, size, 3))
    image = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return Scene(image=image, objects=objects, captions=_captions(objects, axis, size))


def write_synthetic_dataset(
    out_dir: str | Path, num_train: int = 200, num_val: int = 40, seed: int = 0, image_size: int = 96
) -> SyntheticDataset:
    """Generate the train/val scenes and write images, features, captions and the box manifest under out_dir.

    Scene i of split s is drawn from its own generator seeded (seed, s, i), so a split's content does not depend
    on the other split's size and a smaller call yields a prefix of a larger one. Same seed → byte-identical
    images and text.jsonl and identical feature rows, except that the `source` column and the boxes.jsonl `uri`
    are the images' absolute file:// URIs and so name out_dir. PNGs left in images/{train,val} by an earlier,
    larger call are removed so that the image dir holds exactly this dataset.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"split sizes must be non-negative, got num_train={num_train} num_val={num_val}")
    root = Path(out_dir).resolve()
    images_dir = root / "images"
    features_path = root / "features" / "part-0.parquet"
    text_path = root / "text.jsonl"
    boxes_path = root / "boxes.jsonl"
    features_path.parent.mkdir(parents=True, exist_ok=True)

    rows, texts, manifest = [], [], []
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        split_dir = images_dir / split
        split_dir.mkdir(parents=True, exist_ok=True)
        names = {f"{i:06d}.png" for i in range(count)}
        for stale in split_dir.glob("*.png"):
            if stale.name not in names:
                stale.unlink()
        for i in range(count):
            scene = generate_scene(np.random.default_rng([seed, split_index, i]), image_size)
            image_id = f"{split}/{i:06d}"
            path = split_dir / f"{i:06d}.png"
            scene.image.save(path, format="PNG")
            uri = path.as_uri()
            rows.append(
                feature_row(
                    image_id=image_id,
                    source=uri,
                    width=image_size,
                    height=image_size,
                    boxes=scene.boxes,
                    appearance=pixel_region_features(scene.image, scene.boxes),
                    scores=[1.0] * len(scene.objects),
                    labels=scene.labels,
                    tags=scene.tags,
                    detector=PIXEL_DETECTOR_NAME,
                )
            )
            texts.extend({"image_id": image_id, "text": t, "kind": "caption", "split": split} for t in scene.captions)
            manifest.append({"uri": uri, "image_id": image_id, "boxes": scene.boxes.tolist(), "labels": scene.labels})

    pq.write_table(pa.Table.from_pylist(rows, schema=FEATURES_SCHEMA), features_path)
    _write_jsonl(text_path, texts)
    _write_jsonl(boxes_path, manifest)
    return SyntheticDataset(
        root=root,
        images_dir=images_dir,
        features_path=features_path,
        text_path=text_path,
        boxes_path=boxes_path,
        num_train=num_train,
        num_val=num_val,
        num_captions=len(texts),
    )


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
