"""`vinvl_retrieval`: one split of a VinVL/Oscar retrieval dir, as microsoft/Oscar `oscar/run_retrieval.py`
(RetrievalDataset) reads it, and the Oscar-v1 `.pt` layout Mengzi's retrieval script uses.

- `{split}_captions.pt`: {image id (int): list of captions, or a json string of that list}; image order = key order;
  → text rows (`kind: caption`, `caption_index` = position in the image's list);
- features: `features.tsv` (key, num_boxes, base64) + `predictions.tsv` beside it, or the Oscar-v1 dicts
  `{split}_img_frcnn_feats.pt` {key: FloatTensor(N, 2054)} and `{split}_vg_labels.pt` {key: object list | tag
  string} (a tag string carries no per-region classes: the row keeps it as its single tag, labels stay empty);
- `{split}_img_keys_1k.tsv` (one key a line) or a torch-saved key list → `eval_image_keys.txt` (our image ids);
- `{split}_caption_indexs_top20.pt` {key: [[img_key, cap_idx], ...] or its json} → `eval_candidates.json`
  ({image_id: [[image_id, caption_index], ...]}), the evaluation's rerank candidates.
Every `.pt` goes through `torch.load(weights_only=True)` and is refused if that fails: such files are never
unpickled in full.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np

from mengzi_ray import storage
from mengzi_ray.config import ConfigError
from mengzi_ray.features.oscar_import.cards import VinvlRetrievalImport
from mengzi_ray.features.oscar_import.common import KeySet, RowError, exists, normalize_image_id, open_binary, tsv_lines
from mengzi_ray.features.oscar_import.outputs import ImportRun
from mengzi_ray.features.oscar_import.regions import region_record
from mengzi_ray.features.oscar_import.tsv_formats import join_feature_tsv


def load_pt(uri: str) -> Any:
    """A `.pt` file through `torch.load(weights_only=True)` (memory-mapped when local); ConfigError when the file
    needs a full unpickle (it holds objects other than tensors and plain containers) or is not a torch file."""
    import pickle

    import torch

    fs, path = storage.filesystem_for(uri)
    try:
        if not storage.is_remote(uri):
            if not exists(uri):
                raise ConfigError(f"{uri}: file not found")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        with open_binary(uri) as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{uri}: refused: torch.load(weights_only=True) cannot read it (it holds objects other "
                          f"than tensors and plain containers; we never fully unpickle data files): "
                          f"{str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ConfigError(f"{uri}: not a readable torch file: {str(exc).splitlines()[0]}") from None


def _json_or_value(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RowError("json", f"{what} is a string that is not json") from None
    return value


def _dict(value: Any, uri: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{uri}: expected a dict, got {type(value).__name__}")
    return value


def caption_texts(run: ImportRun, uri: str, split: str, check_features: bool) -> None:
    """{id: captions} → text rows; per image a bad entry, an id without features or an id seen before (1 and "1")
    is one failed row."""
    seen = KeySet()
    for position, (key, value) in enumerate(_dict(load_pt(uri), uri).items(), start=1):
        run.log.read["images"] += 1
        try:
            image_id = normalize_image_id(key)
            captions = _json_or_value(value, f"{uri} entry {position} ({key!r})")
            if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
                raise RowError("caption", f"{uri} entry {position} ({key!r}): captions are not a list of strings")
            if check_features and image_id not in run.image_ids:
                raise RowError("no_features", f"{uri} entry {position}: image {image_id!r} has no features")
            if not seen.add(image_id):
                raise RowError("duplicate_id", f"{uri} entry {position}: key {key!r} names image {image_id!r} again")
        except RowError as exc:
            run.fail("images", uri, position, exc, str(key))
            continue
        for index, caption in enumerate(captions):
            run.add_text({"image_id": image_id, "text": caption, "kind": "caption", "split": split,
                          "caption_index": index})
    seen.close()


def oscar_v1_features(run: ImportRun, feats_uri: str, labels_uri: str) -> None:
    """Oscar-v1 dicts {key: FloatTensor(N, 2054)} + {key: objects | tag string} → features/."""
    feats, labels = _dict(load_pt(feats_uri), feats_uri), _dict(load_pt(labels_uri), labels_uri)
    by_id = {}
    for key in labels:
        try:
            by_id.setdefault(normalize_image_id(key), key)
        except RowError:
            continue
    for position, (key, tensor) in enumerate(feats.items(), start=1):
        run.log.read["features"] += 1
        where = f"{feats_uri} entry {position} ({key!r})"
        try:
            image_id = normalize_image_id(key)
            if image_id not in by_id:
                raise RowError("no_labels", f"{where}: image {image_id!r} has no entry in {labels_uri}")
            vectors = np.asarray(tensor.float().numpy() if hasattr(tensor, "numpy") else tensor, np.float32)
            if vectors.ndim != 2:
                raise RowError("feature_length", f"{where}: expected a (N, 2054) tensor, got {vectors.shape}")
            label = labels[by_id[image_id]]
            if isinstance(label, str) and label.lstrip()[:1] in ("[", "{"):
                label = _json_or_value(label, f"{labels_uri} entry {key!r}")
            tag_string = label if isinstance(label, str) else None
            if tag_string is not None:  # no per-region classes: regions keep their boxes, the string its tags
                label = [{"class": "region"} for _ in range(len(vectors))]
            record = region_record(image_id, vectors, label, source=f"{feats_uri}#{key}", detector=run.card.detector,
                                   tags=run.tags, where=where)
            if tag_string is not None:
                record.labels, record.scores, record.tags = [], [], [" ".join(tag_string.split())]
        except RowError as exc:
            run.fail("features", feats_uri, position, exc, str(key))
            continue
        run.add_feature(record, feats_uri, position)


def eval_image_keys(run: ImportRun, uri: str) -> int:
    """Evaluation image keys (.tsv/.txt one a line, or a torch-saved list) → eval_image_keys.txt."""
    if uri.endswith(".pt"):
        keys = load_pt(uri)
        if not isinstance(keys, (list, tuple)):
            raise ConfigError(f"{uri}: expected a list of image keys, got {type(keys).__name__}")
        ids = [normalize_image_id(k) for k in keys]
    else:
        ids = [normalize_image_id(cols[0]) for _, _, cols in tsv_lines(uri) if cols]
    run.write_text_file("eval_image_keys.txt", ids)
    return len(ids)


def eval_candidates(run: ImportRun, uri: str) -> int:
    """{key: [[img_key, cap_idx], ...] (or its json)} → eval_candidates.json with our image ids."""
    table = _dict(load_pt(uri), uri)

    def lines() -> Any:
        yield "{"
        for n, (key, pairs) in enumerate(table.items()):
            pairs = _json_or_value(pairs, f"{uri} entry {key!r}")
            ours = [[normalize_image_id(p[0]), int(p[1])] for p in pairs]
            yield ("," if n else "") + json.dumps(normalize_image_id(key)) + ": " + json.dumps(ours)
        yield "}"

    run.write_text_file("eval_candidates.json", lines())
    return len(table)


def split_features(card: VinvlRetrievalImport, split: str) -> tuple[str, str]:
    """(features, labels) of a split: the card's, else <dir>/features.tsv + predictions.tsv (all splits), else the
    Oscar-v1 per-split .pt dicts."""
    d = card.dir.rstrip("/")
    if card.features:
        features = card.features
    elif exists(posixpath.join(d, "features.tsv")):
        features = posixpath.join(d, "features.tsv")
    else:
        features = posixpath.join(d, f"{split}_img_frcnn_feats.pt")
    if card.labels:
        return features, card.labels
    if features.endswith(".pt"):
        return features, posixpath.join(d, f"{split}_vg_labels.pt")
    return features, posixpath.join(posixpath.dirname(features), "predictions.tsv")


def run_vinvl_retrieval(card: VinvlRetrievalImport) -> dict[str, Any]:
    """Retrieval split(s) → features/ + text.jsonl (+ eval_image_keys.txt, eval_candidates.json of `split`)."""
    d = card.dir.rstrip("/")
    run = ImportRun(card)
    imported: set[str] = set()
    for split in [card.split, *card.more_splits]:
        features, labels = split_features(card, split)
        if features not in imported:  # a features.tsv shared by all splits is read once
            imported.add(features)
            if features.endswith(".pt"):
                oscar_v1_features(run, features, labels)
            else:
                join_feature_tsv(run, features, "vinvl", labels)
        caption_texts(run, posixpath.join(d, f"{split}_captions.pt"), split, check_features=True)
    extra: dict[str, Any] = {"splits": [card.split, *card.more_splits]}
    keys = card.img_keys or posixpath.join(d, f"{card.split}_img_keys_1k.tsv")
    if card.img_keys or exists(keys):
        extra["eval_image_keys"] = eval_image_keys(run, keys)
    index = card.caption_index or posixpath.join(d, f"{card.split}_caption_indexs_top20.pt")
    if card.caption_index or exists(index):
        extra["eval_candidates"] = eval_candidates(run, index)
    return run.finish(**extra)
