"""A deterministic synthetic Chinese image-caption set: coloured shapes on a light background (docs/data-contracts.md §5).

Each scene holds 1–3 non-overlapping objects, each a distinct (colour, shape) pair. Multi-object scenes lay their
objects out in a row or a column so that 左边/右边/上面/下面 are unambiguous, and every caption is a function of
colours, shapes and positions — a captioner has to read the regions to beat the caption prior, and a retriever
has to tell scenes apart by exactly those properties.

`unique=True` (the retrieval query set): every object also has a size (大 | 小, visible in its box), most scenes
hold three objects, and every caption names every object with colour, size, shape and order, so a caption
describes exactly one scene; `write_synthetic_dataset(unique=True)` redraws a scene whose description an earlier
scene of its split already has, so within a split every caption belongs to exactly one image (brute-force
retrieval then has one right answer per caption query).

On disk (`write_synthetic_dataset`), in the contracts of docs/data-contracts.md:
  images/{train,val}/<NNNNNN>.png   the scenes; image_id = "train/000012" (path under images/, no extension)
  features/part-0.parquet           FEATURES_SCHEMA, one row per image, pixel features over the true boxes
  text.jsonl                        {"image_id", "text", "kind": "caption", "split"}, 3 captions per image
  boxes.jsonl                       {"uri", "image_id", "boxes", "labels"}: the manifest for given-box extraction
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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

SIZES = ("大", "小")
_COMBOS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
_OBJECT_COUNT_P = (0.3, 0.4, 0.3)  # 1, 2, 3 objects
# Unique mode: three-object scenes dominate because they hold most of the distinct descriptions
# (15·14·13 ordered combos × 2³ sizes × 2 axes = 43,680 of the 45,510).
_UNIQUE_COUNT_P = (0.05, 0.25, 0.7)
_UNIQUE_MIN_SIZE = 64  # below this three "大" objects do not fit their slots
_MAX_REDRAWS = 1000
_NOISE_STD = 3.0  # pixel noise, in 0..255 units


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. box: x1, y1, x2, y2 in pixel-edge coordinates, x2/y2 exclusive (it covers columns x1..x2-1)."""

    colour: str  # a key of COLOURS
    shape: str  # a key of SHAPES (the Chinese tag)
    box: tuple[float, float, float, float]
    size: str | None = None  # unique mode: one of SIZES

    @property
    def full_phrase(self) -> str:
        """Unique mode's phrase with the size: 「大红色圆形」."""
        return f"{self.size or ''}{self.colour}{self.shape}"

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


def _side_range(count: int, size: int, size_word: str | None) -> tuple[int, int]:
    """Inclusive side range in pixels of one object: plain mode spans 20–40 % of the image; in unique mode the two
    size classes get disjoint ranges, so 大 and 小 are told apart by the box alone."""
    if count == 1:
        low, high = {None: (0.25, 0.4), "小": (0.2, 0.28), "大": (0.34, 0.42)}[size_word]
        return round(low * size), round(high * size)
    cap = int(min(0.3 * size, size / count - 4))
    low, high = {None: (0.2, 0.3), "小": (0.14, 0.19), "大": (0.24, 0.3)}[size_word]
    return round(low * size), min(cap, int(high * size))


def _layout(
    rng: np.random.Generator, count: int, size: int, sizes: list[str] | None = None
) -> tuple[list[tuple[int, int, int]], str | None]:
    """Square placements (x1, y1, side) in layout order, and the axis ("row" | "column"; None for one object).

    Several objects each get an equal slot along the axis with a 1-pixel gap at both slot ends, and share a
    jittered common line across it, so the along-axis order is the visible order. `sizes` (unique mode) picks
    each object's size class.
    """
    words = sizes or [None] * count
    if count == 1:
        low, high = _side_range(1, size, words[0])
        side = int(rng.integers(low, high + 1))
        x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        return [(x1, y1, side)], None
    axis = "row" if rng.random() < 0.5 else "column"
    slot = size / count
    line = rng.uniform(0.35, 0.65) * size
    placements = []
    for i in range(count):
        side_min, side_max = _side_range(count, size, words[i])
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


def _unique_captions(objects: list[SceneObject], axis: str | None, size: int) -> list[str]:
    """Unique mode: CAPTIONS_PER_IMAGE captions, each naming every object's size, colour, shape and place."""
    phrases = [o.full_phrase for o in objects]
    if axis is None:
        where = _position_word(objects[0], size)
        return [f"图片{where}有一个{phrases[0]}", f"{phrases[0]}在图片{where}", f"一个{phrases[0]}位于{where}"]
    forward, backward = ("从左到右", "从右到左") if axis == "row" else ("从上到下", "从下到上")
    before, after = ("左边", "右边") if axis == "row" else ("上面", "下面")
    if len(objects) == 2:
        a, b = phrases
        return [f"{a}在{b}{before}", f"{b}在{a}{after}", f"{forward}是{a}和{b}"]
    a, b, c = phrases
    return [f"{forward}:{a}、{b}、{c}", f"{b}{before}是{a},{after}是{c}", f"{backward}:{c}、{b}、{a}"]


def generate_scene(rng: np.random.Generator, size: int = 96, unique: bool = False) -> Scene:
    """Render one random scene of size x size pixels; the same generator state gives the same scene.

    1–3 objects, pairwise distinct (colour, shape), side 20–40 % of the image, on a light tinted background with
    mild Gaussian pixel noise (std 3 of 255). `unique`: objects also get a size (大 | 小) and the captions name
    everything (module docstring); needs size >= 64.
    """
    if size < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {size}")
    if unique and size < _UNIQUE_MIN_SIZE:
        raise ValueError(f"unique scenes need an image size of at least {_UNIQUE_MIN_SIZE} pixels, got {size}")
    probabilities = _UNIQUE_COUNT_P if unique else _OBJECT_COUNT_P
    count = int(rng.choice(len(probabilities), p=probabilities)) + 1
    combos = [_COMBOS[i] for i in rng.choice(len(_COMBOS), size=count, replace=False)]
    sizes = [SIZES[int(i)] for i in rng.integers(0, len(SIZES), size=count)] if unique else None
    placements, axis = _layout(rng, count, size, sizes)

    background = tuple(int(v) for v in rng.integers(228, 251, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for n, ((colour, shape), (x1, y1, side)) in enumerate(zip(combos, placements)):
        _draw(draw, shape, x1, y1, side, COLOURS[colour])
        box = (float(x1), float(y1), float(x1 + side), float(y1 + side))
        objects.append(SceneObject(colour, shape, box, sizes[n] if sizes else None))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, _NOISE_STD, size=(size, size, 3))
    image = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    captions = _unique_captions(objects, axis, size) if unique else _captions(objects, axis, size)
    return Scene(image=image, objects=objects, captions=captions)


def _split_scenes(seed: int, split_index: int, count: int, image_size: int, unique: bool) -> Iterator[Scene]:
    """The scenes of one split in order. Scene i comes from generator (seed, split, i); in unique mode a scene whose
    first caption (a full description) an earlier scene already has is redrawn from (seed, split, i, attempt)."""
    seen: set[str] = set()
    for i in range(count):
        scene = generate_scene(np.random.default_rng([seed, split_index, i]), image_size, unique)
        attempt = 0
        while unique and scene.captions[0] in seen:
            attempt += 1
            if attempt > _MAX_REDRAWS:
                raise ValueError(f"no unique scene for image {i} after {_MAX_REDRAWS} draws: {count} images exceed "
                                 f"what the unique attribute space holds at this seed")
            scene = generate_scene(np.random.default_rng([seed, split_index, i, attempt]), image_size, unique)
        seen.add(scene.captions[0])
        yield scene


def write_synthetic_dataset(
    out_dir: str | Path, num_train: int = 200, num_val: int = 40, seed: int = 0, image_size: int = 96,
    unique: bool = False,
) -> SyntheticDataset:
    """Generate the train/val scenes and write images, features, captions and the box manifest under out_dir.

    Scene i of split s is drawn from its own generator seeded (seed, s, i), so a split's content does not depend
    on the other split's size and a smaller call yields a prefix of a larger one. Same seed → byte-identical
    images and text.jsonl and identical feature rows, except that the `source` column and the boxes.jsonl `uri`
    are the images' absolute file:// URIs and so name out_dir. PNGs left in images/{train,val} by an earlier,
    larger call are removed so that the image dir holds exactly this dataset. `unique`: the retrieval query set
    (module docstring); every caption of a split then names exactly one image of it.
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
        for i, scene in enumerate(_split_scenes(seed, split_index, count, image_size, unique)):
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
