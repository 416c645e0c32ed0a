"""Feature tsv importers: `vinvl` (3-column features.tsv), `caption` (key + json feature.tsv), both joined to a
label tsv by key, and `sgb_predictions` (scene_graph_benchmark's predictions.tsv, features inside the objects).

`join_feature_tsv` is also the feature half of the captioning-dir, retrieval-dir and Oscar+ corpus importers.
Labels are looked up through an on-disk key index, so the label tsv may be in any order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any, Literal

from mengzi_ray import storage
from mengzi_ray.features.oscar_import.cards import CaptionTsvImport, SgbPredictionsImport, VinvlTsvImport
from mengzi_ray.features.oscar_import.common import KeyedTsv, RowError, normalize_image_id, tsv_lines
from mengzi_ray.features.oscar_import.outputs import ImportRun
from mengzi_ray.features.oscar_import.regions import (
    decode_base64_floats,
    objects_with_features,
    region_record,
)

FeatureLayout = Literal["vinvl", "caption"]


def _vectors(layout: FeatureLayout, cols: list[str], where: str) -> Any:
    """The region matrix of one feature-tsv line in `layout`."""
    if layout == "vinvl":
        if len(cols) != 3:
            raise RowError("tsv_columns", f"{where}: expected 3 columns (key, num_boxes, base64), got {len(cols)}")
        return decode_base64_floats(cols[2], cols[1], where)
    if len(cols) < 2:
        raise RowError("tsv_columns", f"{where}: expected key<TAB>json, got {len(cols)} column(s)")
    try:
        record = json.loads(cols[-1])
        return decode_base64_floats(record["features"], record["num_boxes"], where)
    except json.JSONDecodeError as exc:
        raise RowError("json", f"{where}: feature json does not parse ({exc.msg})") from None
    except (KeyError, TypeError):
        raise RowError("json", f"{where}: feature json lacks num_boxes/features") from None


def report_index_problems(run: ImportRun, index: KeyedTsv) -> None:
    """Count an index's unreadable lines and duplicate keys as failed label rows."""
    for line in index.bad_lines:
        run.fail("labels", index.uri, line, RowError("tsv_columns", f"{index.uri} line {line}: expected key<TAB>json"))
    for line, key in index.duplicates:
        run.fail("labels", index.uri, line, RowError("duplicate_id", f"{index.uri} line {line}: key {key!r} again"), key)


def join_feature_tsv(run: ImportRun, features: str, layout: FeatureLayout, labels: str,
                     image_id: Callable[[str], str] = normalize_image_id, hw: str | None = None) -> None:
    """Every line of a feature tsv ⨝ its label row (by key) [⨝ its hw row] → run.add_feature; bad lines and
    images without a label row are counted. `image_id` maps a tsv key to our image_id (default: the key)."""
    index = KeyedTsv(labels)
    sizes = KeyedTsv(hw) if hw else None
    try:
        report_index_problems(run, index)
        for number, _, cols in tsv_lines(features):
            where = f"{features} line {number}"
            run.log.read["features"] += 1
            key = cols[0] if cols else None
            try:
                if not cols:
                    raise RowError("encoding", f"{where}: not UTF-8")
                vectors = _vectors(layout, cols, where)
                label_line, label = index.get(cols[0])
                ours = image_id(cols[0])
                record = region_record(ours, vectors, label, source=f"{features}#{cols[0]}",
                                       detector=run.card.detector, tags=run.tags,
                                       where=f"{where} (labels {labels} line {label_line})",
                                       hw=_hw(sizes, cols[0], where))
            except RowError as exc:
                run.fail("features", features, number, exc, key)
                continue
            run.add_feature(record, features, number)
    finally:
        index.close()
        if sizes is not None:
            sizes.close()


def run_feature_tsv(card: VinvlTsvImport | CaptionTsvImport) -> dict[str, Any]:
    """`vinvl` / `caption`: a feature tsv + its label tsv → features/."""
    run = ImportRun(card)
    join_feature_tsv(run, card.features, card.format, card.labels)
    return run.finish()


def _hw(index: KeyedTsv | None, key: str, where: str) -> tuple[int, int] | None:
    """(height, width) of `key` from an hw tsv row (`[{"height", "width"}]` or `{"height", "width"}`)."""
    if index is None:
        return None
    _, value = index.get(key)
    entry = value[0] if isinstance(value, list) and value else value
    try:
        return int(entry["height"]), int(entry["width"])
    except (KeyError, TypeError, ValueError):
        raise RowError("image_size", f"{where}: hw row of {key!r} in {index.uri} has no height/width") from None


def image_file_size(root: str, key: str, where: str) -> tuple[int, int]:
    """(height, width) of `<root>/<key>.<ext>` (the first image extension that exists), from the file's header."""
    from PIL import Image

    from mengzi_ray.features.card import IMAGE_EXTENSIONS

    for ext in IMAGE_EXTENSIONS:
        uri = f"{root.rstrip('/')}/{key}.{ext}"
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, OSError):
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception as exc:  # PIL raises many types for bytes that are not an image
            raise RowError("image_size", f"{where}: {uri} is not a readable image ({exc})") from None
        return height, width
    raise RowError("image_size", f"{where}: no image {key}.<{'|'.join(IMAGE_EXTENSIONS)}> under {root} for its size")


def run_sgb_predictions(card: SgbPredictionsImport) -> dict[str, Any]:
    """`sgb_predictions`: scene_graph_benchmark predictions.tsv (+ hw tsv) → features/ (2048-d features + box
    geometry from rect and the image size; attributes when the objects carry them)."""
    run = ImportRun(card)
    hw = KeyedTsv(card.hw) if card.hw else None
    try:
        if hw is not None:
            report_index_problems(run, hw)
        for number, _, cols in tsv_lines(card.predictions):
            where = f"{card.predictions} line {number}"
            run.log.read["features"] += 1
            key = cols[0] if cols else None
            try:
                if len(cols) < 2:
                    raise RowError("tsv_columns", f"{where}: expected key<TAB>json")
                try:
                    label = json.loads(cols[-1])
                except json.JSONDecodeError as exc:
                    raise RowError("json", f"{where}: prediction json does not parse ({exc.msg})") from None
                vectors = objects_with_features(label, where)
                size = _hw(hw, cols[0], where)
                if size is None and card.images and not ("image_h" in label and "image_w" in label):
                    size = image_file_size(card.images, cols[0], where)
                record = region_record(normalize_image_id(cols[0]), vectors, label,
                                       source=f"{card.predictions}#{cols[0]}", detector=card.detector,
                                       tags=run.tags, where=where, hw=size, size_default=None)
            except RowError as exc:
                run.fail("features", card.predictions, number, exc, key)
                continue
            run.add_feature(record, card.predictions, number)
    finally:
        if hw is not None:
            hw.close()
    return run.finish()
