"""Reference captions and prediction files for evaluation, with input checks that count what is wrong.

References come from our text jsonl (docs/data-contracts.md §3: image_id, text, kind, split) or a COCO captions json
(``annotations`` with ``image_id`` and ``caption``; microsoft/Oscar `oscar/run_captioning.py` `CaptionTSVDataset`).
Predictions come from our Parquet (image_id, caption, score) or the original's ``pred.*.tsv`` (``key \\t [{"caption",
"conf"}, ...]``, first entry). Every image id is a string. Called by the evaluate job
(:mod:`mengzi_ray.evaluation.jobs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mengzi_ray.data.records import read_text_rows

PREDICTION_SCHEMA = pa.schema([("image_id", pa.string()), ("caption", pa.string()), ("score", pa.float64())])
_SHOWN = 5


def load_references(path: str | Path, split: str | None = "val") -> dict[str, list[str]]:
    """image_id → reference captions, in file order.

    ``*.json`` is read as COCO captions format (``split`` ignored); anything else as our text jsonl, keeping rows
    with ``kind == "caption"`` and ``split == split``. Raises ValueError when the file yields no references or a
    COCO file lacks ``annotations``; FileNotFoundError when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: references file not found")
    refs: dict[str, list[str]] = {}
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path}: a COCO captions json needs an 'annotations' list")
        for number, ann in enumerate(data["annotations"]):
            if "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{path}: annotation {number} needs image_id and a caption string")
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        where = "annotations"
    else:
        for row in read_text_rows(path):
            if row["kind"] == "caption" and (split is None or row["split"] == split):
                refs.setdefault(str(row["image_id"]), []).append(row["text"])
        where = f"caption rows of split {split!r}"
    if not refs:
        raise ValueError(f"{path}: no {where}")
    return refs


def check_coverage(reference_ids: list[str], feature_ids: list[str], source: str) -> list[str]:
    """Image ids to evaluate: the referenced ones, in feature order.

    Raises ValueError when referenced images have no features (scoring without them would silently shrink the
    denominator) or when there are duplicate feature ids. Feature images without references are not evaluated;
    the caller reports their count.
    """
    seen: set[str] = set()
    duplicates = {i for i in feature_ids if i in seen or seen.add(i)}
    if duplicates:
        raise ValueError(f"{source}: {len(duplicates)} image ids occur twice, e.g. {sorted(duplicates)[:_SHOWN]}")
    missing = sorted(set(reference_ids) - seen)
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(set(reference_ids))} referenced images have no features, "
            f"e.g. {missing[:_SHOWN]}"
        )
    wanted = set(reference_ids)
    return [i for i in feature_ids if i in wanted]


def read_predictions(path: str | Path) -> dict[str, str]:
    """image_id → caption from a predictions Parquet (PREDICTION_SCHEMA columns) or a pred tsv (first caption).

    Raises ValueError for a file that has neither layout, a malformed tsv line (naming the line) or an image id
    predicted twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    pairs: list[tuple[str, str]] = []
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if not {"image_id", "caption"} <= set(table.column_names):
            raise ValueError(f"{path}: predictions Parquet needs image_id and caption columns")
        pairs = list(zip(table.column("image_id").to_pylist(), table.column("caption").to_pylist()))
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            key, tab, payload = line.partition("\t")
            try:
                entries = json.loads(payload) if tab else None
                pairs.append((key, entries[0]["caption"]))
            except (json.JSONDecodeError, TypeError, IndexError, KeyError):
                raise ValueError(f"{path}:{number}: expected 'key<TAB>[{{\"caption\": ...}}]'") from None
    counts: dict[str, int] = {}
    for image_id, _ in pairs:
        counts[image_id] = counts.get(image_id, 0) + 1
    repeated = [i for i, n in counts.items() if n > 1]
    if repeated:
        raise ValueError(f"{path}: {len(repeated)} image ids predicted more than once, e.g. {repeated[:_SHOWN]}")
    return {str(i): c for i, c in pairs}


def write_predictions(table: pa.Table, path: str | Path) -> Path:
    """Write predictions (PREDICTION_SCHEMA) as one Parquet file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.select(PREDICTION_SCHEMA.names).cast(PREDICTION_SCHEMA), path)
    return path


def pred_tsv_name(data_name: str, split: str, num_beams: int, max_gen_length: int, od_labels: bool) -> str:
    """The original's file name ``pred.<data dir>.<yaml stem>.beam{B}.max{L}[.odlabels].tsv``."""
    return f"pred.{data_name}.{split}.beam{num_beams}.max{max_gen_length}{'.odlabels' if od_labels else ''}.tsv"


def write_pred_tsv(table: pa.Table, path: str | Path) -> Path:
    """One line per image: ``image_id \\t [{"caption": str, "conf": score}]`` (microsoft/Oscar
    `oscar/run_captioning.py` `CaptionTSVDataset`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in table.select(["image_id", "caption", "score"]).to_pylist():
            entry = [{"caption": row["caption"], "conf": row["score"]}]
            f.write(f"{row['image_id']}\t{json.dumps(entry, ensure_ascii=False)}\n")
    return path
