"""Tiny files in the released Oscar / VinVL / scene_graph_benchmark / AIC-ICC layouts, written the way the
original code writes them (tab-joined tsv lines with base64 little-endian float32, `torch.save`d dicts, yaml,
json.dump), for the importer tests and the rehearsal test.

`OriginalImage` holds one image's truth; each writer returns what a correct import must produce.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

CLASSES = ["dog", "cat", "grass", "man", "air conditioner", "table"]


@dataclass
class OriginalImage:
    key: int | str
    appearance: np.ndarray  # (N, 2048) float32
    rects: np.ndarray  # (N, 4) pixels
    classes: list[str]
    confs: list[float]
    height: int
    width: int
    captions: list[str]

    @property
    def geometry(self) -> np.ndarray:
        w, h = float(self.width), float(self.height)
        r = self.rects.astype(np.float32)
        return np.stack([r[:, 0] / w, r[:, 1] / h, r[:, 2] / w, r[:, 3] / h, (r[:, 2] - r[:, 0]) / w,
                         (r[:, 3] - r[:, 1]) / h], axis=1).astype(np.float32)

    @property
    def vectors(self) -> np.ndarray:
        return np.concatenate([self.appearance, self.geometry], axis=1)

    def objects(self, with_feature: bool = False) -> list[dict]:
        out = []
        for i, (rect, cls, conf) in enumerate(zip(self.rects, self.classes, self.confs)):
            obj = {"rect": [float(v) for v in rect], "bbox_id": i, "class": cls, "conf": conf}
            if with_feature:
                obj["feature"] = b64(self.appearance[i])
            out.append(obj)
        return out


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def make_images(n: int, seed: int = 0, int_keys: bool = True, captions_per_image: int = 5) -> list[OriginalImage]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        boxes = int(rng.integers(2, 5))
        h, w = int(rng.integers(300, 700)), int(rng.integers(300, 900))
        x1, y1 = rng.uniform(0, w / 2, boxes), rng.uniform(0, h / 2, boxes)
        rects = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, boxes), y1 + rng.uniform(5, h / 2, boxes)], 1)
        images.append(OriginalImage(
            key=100 + i if int_keys else f"img{i:03d}", appearance=rng.random((boxes, 2048), dtype=np.float32),
            rects=rects.astype(np.float32), classes=[CLASSES[int(c)] for c in rng.integers(0, len(CLASSES), boxes)],
            confs=[round(float(c), 4) for c in rng.uniform(0.2, 1, boxes)], height=h, width=w,
            captions=[f"第{i}张图的第{j}句描述。" for j in range(captions_per_image)]))
    return images


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    """Oscar's tsv_writer: columns joined by tab, one line each, plus the .lineidx of byte offsets."""
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for row in rows:
            line = ("\t".join(row) + "\n").encode("utf-8")
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    path.with_suffix(".lineidx").write_text("".join(f"{o}\n" for o in offsets))


def write_vinvl_features(directory: Path, images: list[OriginalImage], gt: bool = False) -> None:
    """features.tsv (key, num_boxes, base64 2054-d) + predictions[_gt].tsv + imageid2idx.json."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tsv(directory / "features.tsv", [[str(im.key), str(len(im.classes)), b64(im.vectors)] for im in images])
    label = {}
    name = "predictions_gt.tsv" if gt else "predictions.tsv"
    write_tsv(directory / name, [[str(im.key), json.dumps({"image_h": im.height, "image_w": im.width,
                                                            "objects": im.objects(), **label})] for im in images])
    (directory / "imageid2idx.json").write_text(json.dumps({str(im.key): i for i, im in enumerate(images)}))


def write_sgb_predictions(directory: Path, images: list[OriginalImage]) -> tuple[Path, Path]:
    """scene_graph_benchmark predictions.tsv ({"objects": [... "feature"], "relations": null}) + hw tsv."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tsv(directory / "predictions.tsv", [[str(im.key), json.dumps({"objects": im.objects(with_feature=True),
                                                                        "relations": None})] for im in images])
    write_tsv(directory / "hw.tsv", [[str(im.key), json.dumps([{"height": im.height, "width": im.width}])]
                                     for im in images])
    return directory / "predictions.tsv", directory / "hw.tsv"


def write_caption_dir(directory: Path, split: str, images: list[OriginalImage]) -> Path:
    """A VinVL captioning split: <split>.yaml, feature tsv (json), label tsv, caption json, _coco_format.json."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tsv(directory / f"{split}.feature.tsv", [[str(im.key), json.dumps({"num_boxes": len(im.classes),
                                                                             "features": b64(im.vectors)})]
                                                   for im in images])
    write_tsv(directory / f"{split}.label.tsv", [[str(im.key), json.dumps(im.objects())] for im in images])
    write_tsv(directory / f"{split}.hw.tsv", [[str(im.key), json.dumps([{"height": im.height, "width": im.width}])]
                                              for im in images])
    captions = [{"image_id": str(im.key), "id": 10 * i + j, "caption": c}
                for i, im in enumerate(images) for j, c in enumerate(im.captions)]
    (directory / f"{split}_caption.json").write_text(json.dumps(captions, ensure_ascii=False, indent=1))
    coco = {"annotations": [{"image_id": c["image_id"], "id": c["id"], "caption": c["caption"]} for c in captions],
            "images": [{"id": str(im.key)} for im in images], "type": "captions", "info": "dummy", "licenses": ""}
    (directory / f"{split}_caption_coco_format.json").write_text(json.dumps(coco, ensure_ascii=False))
    spec = {"img": f"{split}.img.tsv", "hw": f"{split}.hw.tsv", "label": f"{split}.label.tsv",
            "feature": f"{split}.feature.tsv", "caption": f"{split}_caption.json"}
    (directory / f"{split}.yaml").write_text(yaml.safe_dump(spec))
    return directory / f"{split}.yaml"


def write_retrieval_dir(directory: Path, split: str, images: list[OriginalImage], oscar_v1: bool = False) -> None:
    """A VinVL coco_ir dir (features.tsv layout) or the Oscar-v1 .pt layout, with captions, keys and candidates."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({im.key: (im.captions if i % 2 else json.dumps(im.captions, ensure_ascii=False))
                for i, im in enumerate(images)}, directory / f"{split}_captions.pt")
    if oscar_v1:
        torch.save({im.key: torch.from_numpy(im.vectors) for im in images}, directory / f"{split}_img_frcnn_feats.pt")
        torch.save({im.key: (im.objects() if i % 2 else " ".join(im.classes)) for i, im in enumerate(images)},
                   directory / f"{split}_vg_labels.pt")
        torch.save([im.key for im in images], directory / f"{split}_img_keys_1k.pt")
    else:
        write_vinvl_features(directory, images)
        (directory / f"{split}_img_keys_1k.tsv").write_text("".join(f"{im.key}\n" for im in images))
    keys = [im.key for im in images]
    torch.save({k: json.dumps([[keys[(i + d) % len(keys)], d % 5] for d in range(4)]) for i, k in enumerate(keys)},
               directory / f"{split}_caption_indexs_top20.pt")


def write_oscarplus_corpus(directory: Path, data_dir: Path, images: list[OriginalImage]) -> Path:
    """coco_gqa.yaml: corpus tsv (caption rows for coco, QA rows for gqa), predictions_gt.tsv with gt_objects for
    the coco half, QA_fileB.tsv, and features.tsv per dataset under data_dir."""
    half = len(images) // 2
    coco, gqa = images[:half], images[half:]
    for name, part in (("coco", coco), ("gqa", gqa)):
        write_vinvl_features(data_dir / f"{name}_feats", part)
        labels = directory / f"{name}_labels"
        labels.mkdir(parents=True, exist_ok=True)
        rows = []
        for im in part:
            payload = {"image_h": im.height, "image_w": im.width, "objects": im.objects()}
            if name == "coco":
                payload["gt_objects"] = [{"class": "man"}, {"class": "table"}]
            rows.append([str(im.key), json.dumps(payload)])
        write_tsv(labels / "predictions_gt.tsv", rows)
    qa_rows, corpus = [], []
    for im in coco:
        corpus += [[f"coco_{im.key}", f"coco_{im.key}", c] for c in im.captions[:2]]
    for j, im in enumerate(gqa):
        qa_id = str(5000 + j)
        corpus.append([f"gqa_{im.key}", f"gqa_qa_{im.key}_{qa_id}", f"图{im.key}里有什么？"])
        qa_rows.append([qa_id, json.dumps({"labels": ["狗", "草地"], "conf": [1.0, 0.5]}, ensure_ascii=False)])
    write_tsv(directory / "gqa_labels" / "QA_fileB.tsv", qa_rows)
    write_tsv(directory / "corpus.tsv", corpus)
    spec = {"corpus": "coco_gqa", "corpus_file": "corpus.tsv",
            "image_label_path": {"coco": "coco_labels", "gqa": "gqa_labels"},
            "image_feature_path": {"coco": "coco_feats", "gqa": "gqa_feats"}}
    (directory / "coco_gqa.yaml").write_text(yaml.safe_dump(spec))
    return directory / "coco_gqa.yaml"


def write_aic_annotations(path: Path, images: list[OriginalImage]) -> Path:
    """caption_*_annotations.json: [{"url", "image_id": "<hash>.jpg", "caption": [5 strings]}]."""
    rows = [{"url": f"http://img.example/{im.key}.jpg", "image_id": f"{im.key}.jpg",
             "caption": ["\n" + im.captions[0]] + im.captions[1:]} for im in images]
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path
