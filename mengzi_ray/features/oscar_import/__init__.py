"""`mengzi-ray import-oscar`: the released Oscar / VinVL / Mengzi-Oscar files and the AIC-ICC annotations → our
datasets, one importer per source layout (the card's `format:`):

| format | reads | writes |
|---|---|---|
| `vinvl` | features.tsv (key, num_boxes, base64) + predictions.tsv | features/ |
| `caption` | feature.tsv (key, {num_boxes, features}) + label tsv | features/ |
| `sgb_predictions` | scene_graph_benchmark predictions.tsv (+ hw tsv) | features/ |
| `vinvl_caption` | a captioning split yaml: feature + label tsv, caption json, its _coco_format.json | features/, text.jsonl, references_<split>.json |
| `vinvl_retrieval` | a retrieval dir: {split}_captions.pt, features (tsv or Oscar-v1 .pt), img keys, caption index | features/, text.jsonl, eval_image_keys.txt, eval_candidates.json |
| `oscarplus_corpus` | the Oscar+ corpus yaml: corpus tsv, predictions_gt.tsv, QA_fileB.tsv, features.tsv (chunked) | text.jsonl with text_b, features/ |
| `aic_icc` | caption_*_annotations_*.json | text.jsonl |

Every importer streams (memory does not grow with the number of rows), normalises every image id once
(`common.normalize_image_id`), counts bad rows by reason with file and line (`import_errors.jsonl`) and writes
`import_summary.json`; it exits non-zero above the card's `max_error_fraction`. `.pt` files are read only with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from typing import Any

from pydantic import RootModel


def run_import(card: Any) -> dict[str, Any]:
    """Run the importer of `card.format` (an ImportOscarCard or one of its format cards); returns the summary."""
    if isinstance(card, RootModel):
        card = card.root
    if card.format in ("vinvl", "caption"):
        from mengzi_ray.features.oscar_import.tsv_formats import run_feature_tsv as job
    elif card.format == "sgb_predictions":
        from mengzi_ray.features.oscar_import.tsv_formats import run_sgb_predictions as job
    elif card.format == "vinvl_caption":
        from mengzi_ray.features.oscar_import.captions import run_vinvl_caption as job
    elif card.format == "vinvl_retrieval":
        from mengzi_ray.features.oscar_import.retrieval_dir import run_vinvl_retrieval as job
    elif card.format == "oscarplus_corpus":
        from mengzi_ray.features.oscar_import.corpus import run_oscarplus_corpus as job
    elif card.format == "aic_icc":
        from mengzi_ray.features.oscar_import.captions import run_aic_icc as job
    else:
        raise ValueError(f"import-oscar: unknown format {card.format!r}")
    return job(card)
