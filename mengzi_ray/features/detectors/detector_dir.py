"""A detector dir: `model.safetensors` + `labelmap.json` + `detector.yaml`, and how a card section uses one.

Written by `mengzi-ray import-detector` (features/detector_import.py); read wherever a `DetectorSection` has
`model_dir` set. `detector.yaml` holds every inference setting as `DetectorSection` fields; `labelmap.json` is
``{"classes": [names of classes 1..C-1], "attributes": [names of attributes 0..A-1, 0 = no attribute]}``.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from mengzi_ray import storage
from mengzi_ray.features.card import DetectorSection

WEIGHTS_FILE = "model.safetensors"
LABELMAP_FILE = "labelmap.json"
SETTINGS_FILE = "detector.yaml"
# Fields that locate the dir's files: never stored in detector.yaml.
_LOCATION_FIELDS = {"model_dir", "weights", "label_map", "attribute_map", "allow_random_weights"}


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def read_settings(model_dir: str) -> dict[str, Any]:
    """The dir's detector.yaml as a dict of DetectorSection fields (validated by the caller)."""
    uri = _join(model_dir, SETTINGS_FILE)
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: missing — is {model_dir} a detector dir written by import-detector?") from None
    settings = yaml.safe_load(text)
    if not isinstance(settings, dict):
        raise ValueError(f"{uri}: expected a mapping of detector settings")
    stray = sorted(set(settings) & _LOCATION_FIELDS)
    if stray:
        raise ValueError(f"{uri}: {stray} locate files and cannot be set in a detector dir")
    return settings


def resolve_detector(section: DetectorSection) -> DetectorSection:
    """The section with its model_dir applied: the dir's settings, overridden by every field the card set
    explicitly, and weights / label_map / attribute_map pointing into the dir. Sections without model_dir and
    already-resolved ones come back unchanged."""
    if not section.model_dir:
        return section
    root = section.model_dir
    merged = read_settings(root)
    explicit = section.model_dump(include=section.model_fields_set - _LOCATION_FIELDS)
    merged.update(explicit)
    labelmap = _join(root, LABELMAP_FILE)
    merged.update(weights=_join(root, WEIGHTS_FILE), label_map=labelmap)
    if read_labelmap_json(labelmap).get("attributes"):
        merged["attribute_map"] = labelmap
    try:
        return DetectorSection.model_validate(merged)
    except ValueError as exc:
        raise ValueError(f"detector dir {root}: its settings with the card's overrides are invalid: {exc}") from None


def read_labelmap_json(uri: str) -> dict[str, Any]:
    """A labelmap.json (or a plain JSON list of class names) → {"classes": [...], "attributes": [...] or None}."""
    value = json.loads(storage.read_bytes(uri).decode("utf-8"))
    if isinstance(value, list):
        return {"classes": value, "attributes": None}
    if not isinstance(value, dict) or not isinstance(value.get("classes"), list):
        raise ValueError(f"{uri}: expected a JSON list of names or {{'classes': [...], 'attributes': [...]}}")
    return {"classes": value["classes"], "attributes": value.get("attributes")}


def names_from(uri: str, key: str) -> list[str]:
    """The `key` list ("classes" or "attributes") of a labelmap.json; a plain JSON list file is that list."""
    value = json.loads(storage.read_bytes(uri).decode("utf-8"))
    names = value.get(key) if isinstance(value, dict) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{uri}: expected a JSON list of non-empty names or a labelmap.json with a {key!r} list")
    return names


def write_detector_dir(out: str, weights: bytes, classes: list[str], attributes: list[str] | None,
                       settings: dict[str, Any]) -> None:
    """Write the three files (local or s3://), settings validated as a DetectorSection first; detector.yaml last,
    so a dir that has it is complete."""
    probe = DetectorSection.model_validate({**settings, "allow_random_weights": True})
    if len(classes) != probe.num_classes - 1:
        raise ValueError(f"{len(classes)} class names for num_classes={probe.num_classes} (background excluded)")
    storage.write_bytes(_join(out, WEIGHTS_FILE), weights)
    labelmap = {"classes": classes, "attributes": attributes}
    storage.write_bytes(_join(out, LABELMAP_FILE), json.dumps(labelmap, ensure_ascii=False, indent=1).encode())
    storage.write_bytes(_join(out, SETTINGS_FILE), yaml.safe_dump(settings, sort_keys=True).encode())
