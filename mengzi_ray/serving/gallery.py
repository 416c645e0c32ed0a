"""The searchable gallery: images (region vectors + Chinese tags) and captions, read from a feature dataset.

Loaded by the `Retriever` deployment at start-up and when `user_config.gallery` changes; readable without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mengzi_ray.data.records import read_text_rows

from mengzi_ray.features.layout import region_arrays_of
from mengzi_ray.serving.captioning import RegionSet
from mengzi_ray.serving.settings import GallerySection
from mengzi_ray.storage import filesystem_for
from mengzi_ray.text.tags import region_tags

IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
MAX_IMAGE_BYTES = 32 * 1024 * 1024


@dataclass
class Gallery:
    """Images in dataset order and the caption gallery (captions of the chosen split, each naming its image)."""

    image_ids: list[str]
    regions: list[RegionSet]
    sources: list[str]
    captions: list[str]
    caption_image_ids: list[str]

    def __post_init__(self) -> None:
        self.index_of = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if len(self.index_of) != len(self.image_ids):
            raise ValueError("gallery image_ids are not unique")

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_bytes(self, image_id: str, images_root: str | None) -> bytes | None:
        """The gallery image's bytes (the demo page shows them), or None. Only a local file (file:// URI, percent-
        decoded, or an absolute path) that resolves, symlinks followed, to a file under `images_root` and starts with
        a PNG or JPEG signature is served: a dataset's `source` column is third-party data (import-oscar copies it
        from predictions.tsv), so it must never name an arbitrary file of the replica."""
        index = self.index_of.get(image_id)
        if index is None or images_root is None:
            return None
        source = self.sources[index]
        if source.startswith("file://"):
            location = unquote(urlparse(source).path)
        elif source.startswith("/"):
            location = source
        else:
            return None
        root = Path(images_root).resolve()
        path = Path(location).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        with path.open("rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
        return data if len(data) <= MAX_IMAGE_BYTES and data.startswith(IMAGE_SIGNATURES) else None


def read_caption_rows(uri: str, split: str | None) -> tuple[list[str], list[str]]:
    """(captions, their image_ids) of a text jsonl (local or s3://), of one split or all."""
    rows = read_text_rows(uri)
    chosen = [r for r in rows if r["kind"] == "caption" and (split is None or r["split"] == split)]
    return [str(r["text"]) for r in chosen], [r["image_id"] for r in chosen]


def load_gallery(section: GallerySection, tag_map: str | None = None) -> Gallery:
    """Read the features (and captions) the section names. With `texts` and `split`, the gallery is the images that
    have captions of that split; captions of images outside the gallery are dropped, so every hit names its image.
    `tag_map` (the model dir's) re-tags the regions from their English labels (text.tags.region_tags)."""
    fs, path = filesystem_for(section.features)
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "source", "features", "tags", "labels"])
    captions: list[str] = []
    caption_ids: list[str] = []
    if section.texts is not None:
        captions, caption_ids = read_caption_rows(section.texts, section.split)
        if section.split is not None:
            table = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(set(caption_ids)), pa.string())))
    if section.max_images is not None:
        table = table.slice(0, section.max_images)
    if table.num_rows == 0:
        raise ValueError(f"{section.features}: no gallery images (split={section.split!r}, max_images={section.max_images})")
    image_ids = table.column("image_id").to_pylist()
    regions = [
        RegionSet(feats, region_tags(labels, tags, tag_map))
        for feats, tags, labels in zip(region_arrays_of(table), table.column("tags").to_pylist(),
                                       table.column("labels").to_pylist())
    ]
    known = set(image_ids)
    kept = [(text, image_id) for text, image_id in zip(captions, caption_ids) if image_id in known]
    captions, caption_ids = [t for t, _ in kept], [i for _, i in kept]
    return Gallery(image_ids, regions, table.column("source").to_pylist(), captions, caption_ids)

