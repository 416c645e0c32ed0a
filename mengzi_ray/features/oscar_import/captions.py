"""Caption-text importers: `vinvl_caption` (one split of a VinVL captioning dir, read the way microsoft/Oscar
`oscar/run_captioning.py` CaptionTSVDataset reads it) and `aic_icc` (the AI Challenger annotations).

`vinvl_caption`: the split yaml names, relative to its own dir: `feature` (tsv: key, {"num_boxes", "features"}),
`label` (tsv: key, object list), `caption` (json list of {"image_id", "caption"}), `hw` (tsv: key, [{height,
width}]: the image sizes for the box geometry when present; Oscar itself ignores it), `img` and optional CBS keys
(ignored). Writes features/ (feature ⨝ label), text.jsonl (one row per caption, `kind: caption`, the split = the
yaml's stem) and, when `<caption stem>_coco_format.json` sits beside the caption json, a byte copy of it as
`references_<split>.json` (the evaluation's COCO-format references).

`aic_icc`: `caption_train_annotations_20170902.json` / `caption_validation_annotations_20170910.json`, one JSON
array of `{"url": ..., "image_id": "<sha1>.jpg", "caption": [5 strings]}`, read element by element. Our image_id
is the file name without its extension (with the card's `image_id_prefix`), which is the id the extraction job
gives that image file when the image dir is listed (path relative to the root, no extension). Captions are kept as
written except for surrounding whitespace (the files hold some "\\n"-prefixed ones); an empty caption is a failed
row.
"""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath
from typing import Any

import yaml

from mengzi_ray.config import ConfigError
from mengzi_ray.features.oscar_import.cards import AicIccImport, VinvlCaptionImport
from mengzi_ray.features.oscar_import.common import RowError, exists, json_array, normalize_image_id, open_binary
from mengzi_ray.features.oscar_import.outputs import ImportRun
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


def aic_image_id(file_name: Any, prefix: str = "") -> str:
    """AIC-ICC `image_id` ("<hash>.jpg") → our image_id (prefix + "<hash>")."""
    name = normalize_image_id(file_name)
    return prefix + posixpath.splitext(name)[0]


def run_aic_icc(card: AicIccImport) -> dict[str, Any]:
    """Annotations json(s) → text.jsonl (one row per caption, `kind: caption`, the card's split, then each of
    more_annotations)."""
    run = ImportRun(card)
    images = {card.split: annotation_rows(run, card.annotations, card.split, card.image_id_prefix)}
    for split, source in card.more_annotations.items():
        images[split] = annotation_rows(run, source, split, card.image_id_prefix)
    return run.finish(images=images)


def annotation_rows(run: ImportRun, source: str, split: str, prefix: str) -> int:
    """One annotations json → text rows of `split`; returns the number of images read."""
    images = 0
    try:
        for line, element in json_array(source):
            run.log.read["images"] += 1
            try:
                if not isinstance(element, dict) or not isinstance(element.get("caption"), list):
                    raise RowError("caption", f"{source} line {line}: expected {{url, image_id, caption: [...]}}")
                image_id = aic_image_id(element.get("image_id"), prefix)
            except RowError as exc:
                run.fail("images", source, line, exc)
                continue
            images += 1
            for index, caption in enumerate(element["caption"]):
                run.log.read["text"] += 1
                text = caption.strip() if isinstance(caption, str) else ""
                if not text:
                    run.fail("text", source, line, RowError("caption", f"{source} line {line}: caption {index} "
                                                            f"of {image_id!r} is empty or not a string"), image_id)
                    continue
                run.add_text({"image_id": image_id, "text": text, "kind": "caption", "split": split})
    except RowError as exc:
        run.fail("images", source, None, exc)
    return images
