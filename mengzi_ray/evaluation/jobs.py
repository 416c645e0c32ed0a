"""The evaluate job: `mengzi-ray evaluate --config jobs/eval_*.yaml` → :func:`run_evaluate`.

Inputs are checked before any model runs, and every mismatch is an error naming the file and the counts
(ConfigError): referenced images without features, predictions for images without references, images with fewer
captions than the protocol's k, an empty gallery. Feature images that have no references are not evaluated; their
count is a warning in metrics.json and the log. Outputs in ``output_dir``: metrics.json (the returned summary) and
caption: predictions.parquet [+ pred.*.tsv], report.md, examples.png; retrieval: scores.npy.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mengzi_ray.config import ConfigError
from mengzi_ray.evaluation.caption_inference import predict_captions
from mengzi_ray.evaluation.caption_metrics import SubmissionRejected
from mengzi_ray.evaluation.caption_metrics import CaptionScores, score_captions
from mengzi_ray.evaluation.caption_report import Example, draw_examples, find_cjk_font, write_report
from mengzi_ray.evaluation.card import EvaluateCard
from mengzi_ray.evaluation.feature_io import feature_ids, load_regions
from mengzi_ray.evaluation.references import (
    PREDICTION_SCHEMA,
    check_coverage,
    load_references,
    pred_tsv_name,
    read_predictions,
    write_pred_tsv,
    write_predictions,
)
from mengzi_ray.evaluation.retrieval_eval import CrossPairs, build_gallery, rerank_pairs, score_pairs
from mengzi_ray.evaluation.retrieval_metrics import rerank_recall, retrieval_recall
from mengzi_ray.ray_runtime import ensure_ray
from mengzi_ray.modeling.config import OscarConfig
from mengzi_ray.modeling.model_dir import CARD_LAYOUT, input_layout, records_layout
from mengzi_ray.storage import download_dir, is_remote, write_json

log = logging.getLogger(__name__)


def run_evaluate(card: EvaluateCard) -> dict[str, Any]:
    """Run the card's task; returns the summary also written to ``<output_dir>/metrics.json``."""
    ensure_ray(card.ray)
    if not is_remote(card.model_dir) and not (Path(card.model_dir) / "config.json").is_file():
        raise ConfigError(f"model_dir: {card.model_dir} is not a model dir (no config.json)")
    layout, overrides = _model_layout(card)
    references, image_ids, warnings = _plan(card)
    out = Path(card.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "task": card.task,
        "model_dir": card.model_dir,
        "features": card.features,
        "references": card.references,
        "split": card.split,
        "model_layout": layout,
        "warnings": warnings,
    }
    if card.task == "caption":
        summary.update(_evaluate_captions(card, references, image_ids, out, summary, overrides))
    else:
        summary.update(_evaluate_retrieval(card, references, image_ids, out, layout, overrides))
    write_json(str(out / "metrics.json"), summary)
    return summary


def _model_layout(card: EvaluateCard) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input layout, config overrides for the model actors). A dir that records its layout (config.json, or an
    original dir's training_args.bin) is used as is and a card value that contradicts it is refused, naming the
    field; for an original dir without training_args.bin the card's model_layout (and retrieval.att_mask_type)
    are the layout."""
    try:
        local = download_dir(card.model_dir)
        config = OscarConfig.load(local)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model_dir: {exc}") from None
    given = {f"model_layout.{k}": v for k, v in card.model_layout.model_dump(exclude_none=True).items()}
    if card.task == "retrieval" and "att_mask_type" in card.retrieval.model_fields_set:
        given["retrieval.att_mask_type"] = card.retrieval.att_mask_type
    overrides: dict[str, Any] = {}
    if records_layout(config):
        for field, value in given.items():
            recorded = getattr(config, field.split(".")[-1])
            if recorded != value:
                raise ConfigError(f"{field}: the card says {value} but model dir {card.model_dir} records {recorded} "
                                  f"(from {config.layout_source})")
    elif given:
        overrides = {field.split(".")[-1]: value for field, value in given.items()}
        overrides["layout_source"] = CARD_LAYOUT
        try:
            config = OscarConfig.load(local, **overrides)
        except ValueError as exc:
            raise ConfigError(f"model_layout: {exc}") from None
    layout = input_layout(config)
    log.info("model dir %s: input layout %s", card.model_dir, layout)
    return layout, overrides


def _plan(card: EvaluateCard) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(references, ids to evaluate in feature order, warnings); ConfigError on unusable inputs."""
    try:
        references = load_references(card.references, card.split)
        all_ids = feature_ids(card.features)
        image_ids = check_coverage(list(references), all_ids, card.features)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"references / features: {exc}") from None
    warnings = []
    unreferenced = len(all_ids) - len(image_ids)
    if unreferenced:
        warnings.append(f"{unreferenced} of {len(all_ids)} feature images have no references and are not evaluated")
        log.warning(warnings[-1])
    return references, image_ids, warnings


def _evaluate_captions(
    card: EvaluateCard, references: dict[str, list[str]], image_ids: list[str], out: Path, summary: dict[str, Any],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    cap = card.caption
    refs = {i: references[i] for i in image_ids}
    start = time.perf_counter()
    if cap.predictions:
        try:
            predictions = read_predictions(cap.predictions)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"caption.predictions: {exc}") from None
        _check_predictions(predictions, refs, cap.predictions)
        rows = [{"image_id": i, "caption": c, "score": None} for i, c in predictions.items()]
        table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    else:
        table = predict_captions(
            card.features,
            card.model_dir,
            image_ids,
            num_beams=cap.num_beams,
            max_gen_length=cap.max_gen_length,
            num_actors=card.actors.num_actors,
            batch_size=card.actors.batch_size,
            num_gpus_per_actor=card.actors.num_gpus_per_actor,
            num_cpus_per_actor=card.actors.num_cpus_per_actor,
            config_overrides=overrides,
        )
        predictions = dict(zip(table.column("image_id").to_pylist(), table.column("caption").to_pylist()))
    seconds = time.perf_counter() - start
    files = {"predictions": str(write_predictions(table, out / "predictions.parquet"))}
    if cap.write_pred_tsv:
        name = pred_tsv_name(Path(card.features).stem, card.split or "all", cap.num_beams, cap.max_gen_length, True)
        files["pred_tsv"] = str(write_pred_tsv(table, out / name))

    results, rejected = [], {}
    for tokenization in cap.tokenizations:
        try:
            results.append(score_captions(predictions, refs, tokenization=tokenization, metrics=cap.metrics))
        except SubmissionRejected as exc:  # the kit scores nothing: say so instead of reporting zeros
            rejected[tokenization] = str(exc)
            log.warning("%s: %s", tokenization, exc)
    report_summary = {
        **summary,
        "num_images": len(image_ids),
        "num_beams": cap.num_beams,
        "max_gen_length": cap.max_gen_length,
    }
    files.update(_write_human_report(card, table, refs, results, report_summary, out))
    return {
        "num_images": len(image_ids),
        "num_beams": cap.num_beams,
        "max_gen_length": cap.max_gen_length,
        "inference_seconds": round(seconds, 3),
        "metrics": {r.tokenization: r.scores for r in results},
        "skipped": {r.tokenization: r.skipped for r in results if r.skipped},
        "rejected": rejected,
        "files": files,
    }


def _check_predictions(predictions: dict[str, str], refs: dict[str, list[str]], source: str) -> None:
    unknown = [i for i in predictions if i not in refs]
    missing = [i for i in refs if i not in predictions]
    if unknown or missing:
        raise ConfigError(
            f"caption.predictions: {source}: {len(unknown)} predictions for images without references "
            f"(e.g. {unknown[:5]}), {len(missing)} of {len(refs)} referenced images without a prediction "
            f"(e.g. {missing[:5]})"
        )


def _write_human_report(
    card: EvaluateCard,
    table: pa.Table,
    refs: dict[str, list[str]],
    results: list[CaptionScores],
    summary: dict[str, Any],
    out: Path,
) -> dict[str, str]:
    """report.md and, with a CJK font, examples.png of the first caption.num_examples images."""
    chosen = table.column("image_id").to_pylist()[: card.caption.num_examples]
    regions = load_regions(card.features, chosen) if chosen else {}
    captions = dict(zip(table.column("image_id").to_pylist(), table.column("caption").to_pylist()))
    examples = [Example(i, regions[i][2], captions[i], refs[i]) for i in chosen]
    png, reason = None, None
    if not examples:
        reason = "caption.num_examples is 0"
    elif (font := find_cjk_font()) is None:
        reason = "no CJK font installed (e.g. apt-get install fonts-wqy-microhei); Chinese would render as boxes"
        log.warning("examples.png not drawn: %s", reason)
    else:
        png = draw_examples(examples, out / "examples.png", font)
    report = write_report(out / "report.md", results, summary, png, examples, reason)
    files = {"report": str(report)}
    if png is not None:
        files["examples_png"] = str(png)
    return files


def _evaluate_retrieval(
    card: EvaluateCard, references: dict[str, list[str]], image_ids: list[str], out: Path, layout: dict[str, Any],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    ret = card.retrieval
    gallery_ids = _gallery_ids(card, image_ids)
    try:
        regions = load_regions(card.features, gallery_ids, layout["tag_map"])
        gallery = build_gallery(gallery_ids, references, regions, ret.captions_per_image)
        if ret.mode == "rerank":
            pairs, labels, queries = rerank_pairs(gallery, _read_candidates(ret.candidates), ret.captions_per_image)
        else:
            pairs, labels, queries = CrossPairs(gallery.num_images, gallery.num_texts), None, gallery_ids
    except ValueError as exc:
        raise ConfigError(f"retrieval gallery: {exc}") from None
    start = time.perf_counter()
    scores = score_pairs(
        card.model_dir,
        gallery,
        pairs,
        num_actors=card.actors.num_actors,
        chunk_size=ret.chunk_size,
        batch_size=card.actors.batch_size,
        config_overrides=overrides,
        num_gpus_per_actor=card.actors.num_gpus_per_actor,
        num_cpus_per_actor=card.actors.num_cpus_per_actor,
    )
    seconds = time.perf_counter() - start
    if ret.mode == "rerank":
        grid = scores.reshape(len(queries), -1)
        metrics = rerank_recall(grid, labels, ret.ks)
    else:
        grid = scores.reshape(gallery.num_images, gallery.num_texts)
        metrics = retrieval_recall(grid, gallery.text_to_image, ret.ks)
    np.save(out / "scores.npy", grid)
    first_stages = _first_stage_metrics(card, gallery, grid) if ret.mode == "cross" else {}
    return {
        **first_stages,
        "mode": ret.mode,
        "num_images": gallery.num_images,
        "num_texts": gallery.num_texts,
        "num_queries": len(queries),
        "num_pairs": int(pairs.num_pairs),
        "scoring_seconds": round(seconds, 3),
        "pairs_per_second": round(pairs.num_pairs / seconds, 1),
        "metrics": metrics,
        "files": {"scores": str(out / "scores.npy")},
    }


def _first_stage_metrics(card: EvaluateCard, gallery: Any, grid: np.ndarray) -> dict[str, Any]:
    """The first stages' own and two-stage R@K beside the cross-encoder's (evaluation/two_stage.py): "tfidf" for
    every model, "dual_encoder" when the model dir has one."""
    from mengzi_ray.evaluation.two_stage import dual_encoder_report, tfidf_report

    ret = card.retrieval
    out: dict[str, Any] = {"tfidf": tfidf_report(gallery, grid, ret.two_stage_candidates, ret.ks)}
    if OscarConfig.load(download_dir(card.model_dir)).dual_encoder_dim:
        out["dual_encoder"] = dual_encoder_report(card.model_dir, gallery, grid, ret.two_stage_candidates, ret.ks,
                                                  card.actors.batch_size)
    return out


def _gallery_ids(card: EvaluateCard, image_ids: list[str]) -> list[str]:
    ret = card.retrieval
    if ret.image_keys:
        path = Path(ret.image_keys)
        if not path.is_file():
            raise ConfigError(f"retrieval.image_keys: {path} not found")
        keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        available = set(image_ids)
        absent = [k for k in keys if k not in available]
        if absent:
            raise ConfigError(
                f"retrieval.image_keys: {len(absent)} of {len(keys)} keys have no references or no features, "
                f"e.g. {absent[:5]}"
            )
        image_ids = keys
    if ret.num_images is not None:
        if ret.num_images > len(image_ids):
            raise ConfigError(
                f"retrieval.num_images: {ret.num_images} images asked for, only {len(image_ids)} have features and references"
            )
        image_ids = image_ids[: ret.num_images]
    if not image_ids:
        raise ConfigError("retrieval: empty gallery (no image has both features and references)")
    return image_ids


def _read_candidates(path: str | None) -> dict[str, list[tuple[str, int]]]:
    try:
        data = json.loads(Path(str(path)).read_text(encoding="utf-8"))
        return {str(q): [(str(c), int(j)) for c, j in pairs] for q, pairs in data.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"retrieval.candidates: {path}: expected JSON {{image_id: [[image_id, caption_index], ...]}} ({exc})") from None
