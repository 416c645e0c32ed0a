"""The extraction job's inputs: list a local dir / s3:// prefix recursively, or read a jsonl manifest.

Each input is one row {source, image_id, boxes_json, labels_json}: `source` is the full URI (file:///… for local
files, s3://bucket/key), `image_id` the path relative to the listed root without its extension (or the manifest's
image_id), `boxes_json`/`labels_json` the manifest's given boxes/labels as JSON text ("" when absent). Called by
the driver before any work starts, so problems found here are ConfigErrors.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from mengzi_ray import storage
from mengzi_ray.config import ConfigError
from mengzi_ray.features.card import InputSection


def uri_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a file:// URI, an s3:// URI or a plain local path."""
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), unquote(urlparse(uri).path)
    return storage.filesystem_for(uri)


def read_uri(uri: str, attempts: int = 1, backoff_s: float = 0.5) -> bytes:
    """All bytes of the file at `uri`. With attempts > 1 an OSError other than not-found / no-permission (a
    timeout, throttling, a reset connection) is retried after backoff_s, 2·backoff_s, …; the last error is raised."""
    fs, path = uri_location(uri)
    for attempt in range(1, attempts + 1):
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except OSError:
            if attempt == attempts:
                raise
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _source_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else Path(path).as_uri()


def _tree_paths(fs: pafs.FileSystem, root: str) -> list[str]:
    """Every non-directory entry under root. Locally through os.walk, because pyarrow's listing drops entries it
    cannot stat (a dangling symlink): those stay inputs, so their read fails visibly in errors/ instead of the
    image silently missing from the dataset. A directory that cannot be listed (no permission) is a ConfigError
    naming it, not a silently smaller dataset (os.walk would skip it)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return [os.path.join(d, name) for d, _, names in os.walk(root, onerror=_unlistable, followlinks=True) for name in names]
    return [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]


def _unlistable(exc: OSError) -> None:
    raise ConfigError(f"input.uri: cannot list {exc.filename}: {exc.strerror or exc} (its images would be left out)")


def _list_tree(uri: str, extensions: list[str]) -> list[dict[str, Any]]:
    fs, root = storage.filesystem_for(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ConfigError(f"input.uri {uri}: not a directory / prefix (or a .jsonl manifest)")
    wanted = {e.lower().lstrip(".") for e in extensions}
    rows = []
    for path in _tree_paths(fs, root):
        if posixpath.splitext(path)[1].lower().lstrip(".") not in wanted:
            continue
        relative = posixpath.relpath(path, root.rstrip("/"))
        rows.append(
            {
                "source": _source_uri(fs, path),
                "image_id": posixpath.splitext(relative)[0],
                "boxes_json": "",
                "labels_json": "",
            }
        )
    return sorted(rows, key=lambda r: r["image_id"])


def _manifest_row(record: Any, base: str, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("uri"), str) or not record["uri"]:
        raise ConfigError(f"{where}: each line must be a JSON object with a non-empty 'uri'")
    uri = record["uri"]
    if "://" not in uri and not uri.startswith("/"):
        uri = posixpath.join(base, uri) if base.startswith("s3://") else str(Path(base) / uri)
    if "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    image_id = record.get("image_id")
    if image_id is None:
        image_id = posixpath.splitext(urlparse(uri).path.lstrip("/"))[0]
    boxes, labels = record.get("boxes"), record.get("labels")
    if boxes is not None and (
        not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes)
    ):
        raise ConfigError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2]")
    if labels is not None and (boxes is None or not isinstance(labels, list) or len(labels) != len(boxes)):
        raise ConfigError(f"{where}: 'labels' needs 'boxes' and one label per box")
    return {
        "source": uri,
        "image_id": str(image_id),
        "boxes_json": json.dumps(boxes) if boxes is not None else "",
        "labels_json": json.dumps(labels, ensure_ascii=False) if labels is not None else "",
    }


def _read_manifest(uri: str) -> list[dict[str, Any]]:
    try:
        text = read_uri(uri).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"input.uri {uri}: manifest not found") from None
    base = posixpath.dirname(uri) if uri.startswith("s3://") else str(Path(uri).resolve().parent)
    try:
        return [_manifest_row(record, base, f"{uri} line {number}") for number, record in storage.json_lines(text, uri)]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def list_inputs(section: InputSection) -> list[dict[str, Any]]:
    """All inputs of a card's input section, with unique image_ids (ConfigError otherwise)."""
    rows = _read_manifest(section.uri) if section.uri.endswith(".jsonl") else _list_tree(section.uri, section.extensions)
    seen: set[str] = set()
    for row in rows:
        if row["image_id"] in seen:
            raise ConfigError(f"input.uri {section.uri}: image_id {row['image_id']!r} occurs twice")
        seen.add(row["image_id"])
    return rows
