"""`vinvl_caption`: one split of a VinVL captioning dir, read the way Oscar's CaptionTSVDataset reads it
(microsoft/Oscar `oscar/run_captioning.py`).

The split yaml names, relative to its own dir: `feature` (tsv: key, {"num_boxes", "features"}), `label` (tsv: key,
object list), `caption` (json list of {"image_id", "caption"}), `hw` (tsv: key, [{height, width}]: the image sizes
for the box geometry when present; Oscar itself ignores it), `img` and optional CBS keys (ignored). Writes features/ (feature ⨝ label), text.jsonl (one row per caption, `kind: caption`, this
split) and, when `<caption stem>_coco_format.json` sits beside the caption json, a byte copy of it as
`references_<split>.json` (the evaluation's COCO-format references).
"""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath
from typing import Any

import yaml

from mengzi_ray.config import ConfigError
from mengzi_ray.features.oscar_import.cards import VinvlCaptionImport
from mengzi_ray.features.oscar_import.common import RowError, exists, json_array, normalize_image_id, open_binary
from mengzi_ray.features.oscar_import.context import ImportRun
from mengzi_ray.features.oscar_import.tsv_formats import join_feature_tsv


def read_yaml(uri: str) -> dict[str, Any]:
    """A dataset yaml as a mapping (safe_load); ConfigError naming the file otherwise."""
    with open_binary(uri) as f:
        try:
            data = yaml.safe_load(f.read().decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{uri}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{uri}: expected a YAML mapping")
    return data


def beside(yaml_uri: str, relative: str) -> str:
    """A path named in a yaml, resolved against the yaml's dir (absolute paths and URIs are kept)."""
    if relative.startswith("s3://") or relative.startswith("/"):
        return relative
    return posixpath.join(posixpath.dirname(yaml_uri) or ".", relative)


def caption_rows(run: ImportRun, caption_json: str, split: str, check_features: bool) -> None:
    """Caption json elements → text rows; captions of images that have no features are failed (no_features)."""
    try:
        for line, element in json_array(caption_json):
            run.log.read["text"] += 1
            try:
                if not isinstance(element, dict) or not isinstance(element.get("caption"), str):
                    raise RowError("caption", f"{caption_json} line {line}: expected {{image_id, caption: str}}")
                image_id = normalize_image_id(element.get("image_id"))
                if check_features and image_id not in run.image_ids:
                    raise RowError("no_features", f"{caption_json} line {line}: image {image_id!r} has no features")
                if not element["caption"].strip():
                    raise RowError("caption", f"{caption_json} line {line}: empty caption")
            except RowError as exc:
                run.fail("text", caption_json, line, exc)
                continue
            run.add_text({"image_id": image_id, "text": element["caption"], "kind": "caption", "split": split})
    except RowError as exc:  # the json itself is broken: everything after this point is unread
        run.fail("text", caption_json, None, exc)


def caption_split(run: ImportRun, yaml_uri: str, split: str) -> dict[str, Any]:
    """One split yaml → features/ + text rows (+ references_<split>.json); returns what it wrote."""
    spec = read_yaml(yaml_uri)
    missing = [key for key in ("feature", "label") if key not in spec]
    if missing:
        raise ConfigError(f"{yaml_uri}: no {missing} key(s); a captioning yaml names feature, label and caption")
    hw = beside(yaml_uri, spec["hw"]) if "hw" in spec else None
    join_feature_tsv(run, beside(yaml_uri, spec["feature"]), "caption", beside(yaml_uri, spec["label"]),
                     hw=hw if hw and exists(hw) else None)
    done: dict[str, Any] = {}
    if "caption" in spec:
        caption_json = beside(yaml_uri, spec["caption"])
        caption_rows(run, caption_json, split, check_features=True)
        coco = posixpath.splitext(caption_json)[0] + "_coco_format.json"
        if exists(coco):
            run.copy_file(coco, f"references_{split}.json")
            done["references"] = f"references_{split}.json"
    return done


def run_vinvl_caption(card: VinvlCaptionImport) -> dict[str, Any]:
    """Captioning split(s): yaml (+ more_yamls) → features/ + text.jsonl (+ references_<split>.json each)."""
    run = ImportRun(card)
    splits = {card.split or PurePosixPath(card.yaml).stem: caption_split(run, card.yaml,
                                                                           card.split or PurePosixPath(card.yaml).stem)}
    for more in card.more_yamls:
        splits[PurePosixPath(more).stem] = caption_split(run, more, PurePosixPath(more).stem)
    return run.finish(splits=splits)
