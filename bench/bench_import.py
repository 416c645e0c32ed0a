"""import-oscar streams: peak RSS of an import does not grow with the number of rows.

For each (format, rows) the input files are written first (VinVL features.tsv + predictions.tsv with REGIONS
regions per image; an AIC-ICC annotations json with 5 captions per image; an Oscar+ corpus with caption and QA
rows), then the import runs in a fresh Python process that reports its own peak RSS (ru_maxrss) and wall time.
A streaming importer shows the same peak at 10k and 100k rows; one that holds its rows would grow ~10x.

Usage: python bench/bench_import.py [--rows 10000 100000] [--formats vinvl aic_icc oscarplus_corpus]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO_ROOT, git_commit, print_table, write_results

SCRIPT = "bench_import"
REGIONS = 2  # per image; the row count is what the check is about, not the bytes per row


def b64_regions(rng: np.random.Generator) -> str:
    import base64

    return base64.b64encode(rng.random((REGIONS, 2054), dtype=np.float32).astype("<f4").tobytes()).decode()


def write_vinvl(directory: Path, rows: int) -> dict:
    rng = np.random.default_rng(0)
    blob = b64_regions(rng)  # one region matrix reused: decoding cost per row is what counts
    label = json.dumps({"image_h": 480, "image_w": 640, "objects": [
        {"rect": [10.0, 20.0, 200.0, 300.0], "class": "dog", "conf": 0.9},
        {"rect": [0.0, 0.0, 640.0, 480.0], "class": "grass", "conf": 0.5}]})
    with open(directory / "features.tsv", "w") as feats, open(directory / "predictions.tsv", "w") as preds:
        for i in range(rows):
            feats.write(f"{i}\t{REGIONS}\t{blob}\n")
            preds.write(f"{i}\t{label}\n")
    return {"format": "vinvl", "features": str(directory / "features.tsv"),
            "labels": str(directory / "predictions.tsv")}


def write_aic(directory: Path, rows: int) -> dict:
    path = directory / "caption_train_annotations.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(rows):
            element = {"url": f"http://x/{i:040x}.jpg", "image_id": f"{i:040x}.jpg",
                       "caption": [f"第{i}张图片里一个穿着红色衣服的人在草地上{j}。" for j in range(5)]}
            f.write(("," if i else "") + json.dumps(element, ensure_ascii=False))
        f.write("]")
    return {"format": "aic_icc", "annotations": str(path), "split": "train"}


def write_corpus(directory: Path, rows: int) -> dict:
    import yaml

    (directory / "coco").mkdir()
    (directory / "gqa").mkdir()
    images = max(rows // 4, 1)
    with open(directory / "coco" / "predictions_gt.tsv", "w") as f:
        for i in range(images):
            f.write(f"{i}\t" + json.dumps({"objects": [{"class": "dog"}, {"class": "grass"}]}) + "\n")
    with open(directory / "gqa" / "QA_fileB.tsv", "w") as qa, open(directory / "corpus.tsv", "w") as corpus:
        for i in range(rows):
            if i % 2:
                qa.write(f"{i}\t" + json.dumps({"labels": ["狗"]}, ensure_ascii=False) + "\n")
                corpus.write(f"gqa_{i % images}\tgqa_qa_{i % images}_{i}\t图里有什么？\n")
            else:
                corpus.write(f"coco_{i % images}\tcoco_{i % images}\t一只狗在草地上。\n")
    (directory / "c.yaml").write_text(yaml.safe_dump({"corpus": "coco_gqa", "corpus_file": "corpus.tsv",
                                                      "image_label_path": {"coco": "coco", "gqa": "gqa"}}))
    return {"format": "oscarplus_corpus", "yaml": str(directory / "c.yaml")}


WRITERS = {"vinvl": write_vinvl, "aic_icc": write_aic, "oscarplus_corpus": write_corpus}


def child(card_json: str) -> None:
    """Run one import in this process; print {seconds, peak_rss_mib, summary counts} as json."""
    from mengzi_ray.config import validate_card
    from mengzi_ray.features.oscar_import import run_import
    from mengzi_ray.features.oscar_import.cards import ImportOscarCard

    card = validate_card(ImportOscarCard, json.loads(card_json), "bench")
    start = time.perf_counter()
    summary = run_import(card)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1), "read": summary["read"],
                      "written": summary["written"], "failed": summary["failed"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--formats", nargs="+", default=list(WRITERS), choices=list(WRITERS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    commit = git_commit()
    results = []
    for fmt in args.formats:
        for rows in args.rows:
            with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
                fields = WRITERS[fmt](Path(tmp), rows)
                fields["output"] = str(Path(tmp) / "out")
                env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this checkout's mengzi_ray
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(fields)], cwd=REPO_ROOT,
                                     capture_output=True, text=True, check=True, env=env)
                record = {"format": fmt, "rows": rows, **json.loads(out.stdout.strip().splitlines()[-1])}
                results.append(record)
                print(record, flush=True)
    print_table(["format", "input rows", "read", "written", "seconds", "peak RSS MiB"],
                [[r["format"], r["rows"], sum(r["read"].values()), sum(r["written"].values()), r["seconds"],
                  r["peak_rss_mib"]] for r in results])
    write_results(SCRIPT, torch.device("cpu"), commit, {"rows": args.rows, "regions_per_image": REGIONS}, results)


if __name__ == "__main__":
    main()
