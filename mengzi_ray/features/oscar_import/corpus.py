"""`oscarplus_corpus`: the Oscar+ pretraining corpus, as microsoft/Oscar `oscar/datasets/oscar_tsv.py`
(OscarTSVDataset) reads it.

Yaml keys (paths relative to the yaml's dir, except image_feature_path: relative to the original `--data_dir`):
`corpus` (dataset names joined by "_"), `corpus_file` (tsv: img_id, label_id, text_a), `image_label_path`
{dataset: dir with predictions_gt.tsv [+ QA_fileB.tsv]}, `image_feature_path` {dataset: dir with features.tsv,
or chunk subdirs `<chunk>/features.tsv` for googlecc/sbu/oi/objects365/tagoi}.

Text rows: `{"image_id": "<dataset>_<image id>", "text": text_a, "text_b", "text_b_source", "kind", "split",
"dataset"}`; `kind` is `question` for QA rows (label_id with a `qa` field: `..._qa_<image id>_<qa id>`) and their
text_b is the space-joined answers (`labels` of the QA_fileB.tsv row, key = qa id), `text_b_source: qa_answers`;
other rows are `caption` with text_b = the label row's classes translated through the tag map (`gt_objects` when
present and use_gtlabels, `text_b_source: gt_tags`, else `objects`, `tags`). Features (only with `data_dir`):
every features.tsv row ⨝ its predictions_gt.tsv row, image_id `<dataset>_<key>`.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow.fs as pafs

from mengzi_ray import storage
from mengzi_ray.config import ConfigError
from mengzi_ray.features.oscar_import.captions import beside, read_yaml
from mengzi_ray.features.oscar_import.cards import OscarPlusCorpusImport
from mengzi_ray.features.oscar_import.common import KeyedTsv, RowError, exists, normalize_image_id, tsv_lines
from mengzi_ray.features.oscar_import.outputs import ImportRun
from mengzi_ray.features.oscar_import.regions import label_objects
from mengzi_ray.features.oscar_import.tsv_formats import join_feature_tsv, report_index_problems
from mengzi_ray.text.tags import tag_string

CHUNKED_DATASETS = ("googlecc", "sbu", "oi", "objects365", "tagoi")
DATASET_ALIASES = {"cc": "googlecc"}


def dataset_name(name: str) -> str:
    return DATASET_ALIASES.get(name, name)


def parse_ids(img_id: str, label_id: str) -> tuple[str, str, str | None]:
    """(dataset, image id, qa id or None) of a corpus row; RowError("id") when the ids do not have that shape."""
    parts, label_parts = img_id.split("_"), label_id.split("_")
    if len(parts) < 2 or not parts[-1]:
        raise RowError("id", f"img_id {img_id!r} is not <dataset>_[<chunk>_]<image id>")
    if "qa" in label_parts:
        if len(label_parts) < 4:
            raise RowError("id", f"label_id {label_id!r} is not <dataset>_qa_<image id>_<qa id>")
        return dataset_name(parts[0]), normalize_image_id(label_parts[-2]), label_parts[-1]
    return dataset_name(parts[0]), normalize_image_id(parts[-1]), None


class LabelFiles:
    """Per-dataset predictions_gt.tsv / QA_fileB.tsv indexes, opened on first use."""

    def __init__(self, run: ImportRun, yaml_uri: str, label_dirs: dict[str, str]) -> None:
        self.run, self.yaml, self.dirs = run, yaml_uri, {dataset_name(k): v for k, v in label_dirs.items()}
        self.open: dict[str, KeyedTsv] = {}

    def index(self, dataset: str, file: str) -> KeyedTsv:
        key = f"{dataset}/{file}"
        if key not in self.open:
            if dataset not in self.dirs:
                raise RowError("no_labels", f"dataset {dataset!r} has no image_label_path in {self.yaml}")
            uri = posixpath.join(beside(self.yaml, self.dirs[dataset]), file)
            if not exists(uri):
                raise RowError("no_labels", f"{uri} does not exist")
            self.open[key] = KeyedTsv(uri)
            report_index_problems(self.run, self.open[key])
        return self.open[key]

    def close(self) -> None:
        for index in self.open.values():
            index.close()


def text_b(labels: LabelFiles, dataset: str, image_id: str, qa_id: str | None, use_gt: bool, run: ImportRun
           ) -> tuple[str, str]:
    """(text_b, its source) of a corpus row."""
    if qa_id is not None:
        _, row = labels.index(dataset, "QA_fileB.tsv").get(qa_id)
        answers = row.get("labels") if isinstance(row, dict) else None
        if not isinstance(answers, list):
            raise RowError("labels", f"QA_fileB row {qa_id!r} of {dataset} has no labels list")
        return " ".join(str(a) for a in answers), "qa_answers"
    _, row = labels.index(dataset, "predictions_gt.tsv").get(image_id)
    objects, meta = label_objects(row, f"predictions_gt.tsv of {dataset}, image {image_id!r}")
    gt = meta.get("gt_objects")
    source = "gt_tags" if use_gt and isinstance(gt, list) else "tags"
    chosen = gt if source == "gt_tags" else objects
    classes = [str(o["class"]) for o in chosen if isinstance(o, dict) and str(o.get("class", "")).strip()]
    return tag_string(run.tags.translate(classes).tags), source


def corpus_features(run: ImportRun, card: OscarPlusCorpusImport, spec: dict[str, Any], datasets: list[str]) -> None:
    """Every dataset's features.tsv (or chunk dirs) ⨝ its predictions_gt.tsv → features/."""
    assert card.data_dir is not None
    label_dirs = {dataset_name(k): v for k, v in (spec.get("image_label_path") or {}).items()}
    for name, rel in (spec.get("image_feature_path") or {}).items():
        dataset = dataset_name(name)
        if dataset not in datasets:
            continue
        root = posixpath.join(card.data_dir, rel)
        if dataset in CHUNKED_DATASETS:
            fs, path = storage.filesystem_for(root)
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
            dirs = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
            files = [posixpath.join(root, c, "features.tsv") for c in dirs]
        else:
            files = [posixpath.join(root, "features.tsv")]
        labels = posixpath.join(beside(card.yaml, label_dirs.get(dataset, "")), "predictions_gt.tsv")
        for features in files:
            join_feature_tsv(run, features, "vinvl", labels,
                             image_id=lambda key, ds=dataset: f"{ds}_{normalize_image_id(key)}")


def run_oscarplus_corpus(card: OscarPlusCorpusImport) -> dict[str, Any]:
    """Corpus yaml → text.jsonl (text_a + text_b per row) and, with data_dir, features/."""
    spec = read_yaml(card.yaml)
    for key in ("corpus", "corpus_file", "image_label_path"):
        if key not in spec:
            raise ConfigError(f"{card.yaml}: no {key!r} key (an Oscar+ corpus yaml names corpus, corpus_file, "
                              f"image_label_path, image_feature_path)")
    datasets = [dataset_name(n) for n in str(spec["corpus"]).split("_")]
    run = ImportRun(card)
    if card.data_dir:
        corpus_features(run, card, spec, datasets)
    labels = LabelFiles(run, card.yaml, spec["image_label_path"])
    corpus = beside(card.yaml, spec["corpus_file"])
    kinds = {"caption": 0, "question": 0}
    try:
        for number, _, cols in tsv_lines(corpus):
            run.log.read["text"] += 1
            try:
                if len(cols) < 3 or not cols[2]:
                    raise RowError("tsv_columns", f"{corpus} line {number}: expected img_id, label_id, text_a")
                dataset, image_id, qa_id = parse_ids(cols[0], cols[1])
                if dataset not in datasets:
                    raise RowError("dataset", f"{corpus} line {number}: dataset {dataset!r} is not in corpus "
                                              f"{spec['corpus']!r}")
                ours = f"{dataset}_{image_id}"
                if run.has_features() and ours not in run.image_ids:
                    raise RowError("no_features", f"{corpus} line {number}: image {ours!r} has no features")
                b, source = text_b(labels, dataset, image_id, qa_id, card.use_gtlabels, run)
            except RowError as exc:
                run.fail("text", corpus, number, exc)
                continue
            kind = "question" if qa_id is not None else "caption"
            kinds[kind] += 1
            run.add_text({"image_id": ours, "text": cols[2], "text_b": b, "text_b_source": source, "kind": kind,
                          "split": card.split, "dataset": dataset})
    finally:
        labels.close()
    return run.finish(datasets=datasets, kinds=kinds, use_gtlabels=card.use_gtlabels)
