"""`mengzi-ray extract`: images → region-feature Parquet (features/) + one error row per failed input (errors/).

Pipeline (Ray Data, streaming, per chunk of `card.chunk_size` inputs): inputs (features.inputs) → read + decode
tasks (try/except per row; blocks of at most `input.block_bytes` decoded pixels) → detector actors
(`ActorPoolStrategy(min_size, max_size)`, `num_cpus`/`num_gpus`/`batch_size` from the card; a detector failure on a
batch is retried image by image, so only the failing image is lost) → write tasks (about PART_BYTES of features per
file, `features/` in FEATURES_SCHEMA and `errors/` in ERRORS_SCHEMA, under _staging/). Every input of a chunk lands
in exactly one of them, and the job checks that count before publishing. A chunk is the unit of resume: re-running
the same card skips every image_id already present in features/ or errors/ (except the errors `retry_failed` names:
by default read failures, which a re-run tries again), so nothing is recomputed or duplicated. Chunks are written
under _staging/ and moved into place file by file; a torn file found in features/ or errors/ is moved to
quarantine/ and its images redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mengzi_ray import storage
from mengzi_ray.config import JobFailed
from mengzi_ray.features.card import DetectorSection, ExtractCard
from mengzi_ray.features.decode import decode_image, resize_for_detector, shipping_size
from mengzi_ray.features.detectors.base import Detections, build_detector, detections_to_row
from mengzi_ray.features.detectors.detector_dir import resolve_detector
from mengzi_ray.features.inputs import list_inputs, read_uri
from mengzi_ray.features.layout import to_layout, write_features
from mengzi_ray.features.schema import ERRORS_SCHEMA, FEATURES_SCHEMA, REGION_DIM

log = logging.getLogger(__name__)

STAGES = ("read", "access", "decode", "detect")
# Decoded images travel between the decode tasks and the detector actors as raw RGB bytes plus their sizes: width
# and height of the decoded original (what boxes refer to), pixel_width and pixel_height of what is shipped (the
# torchvision_c4 detector's input size where that is exact, decode.shipping_size; else the original).
DECODED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("image_id", pa.string()),
        ("boxes_json", pa.string()),
        ("labels_json", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixel_width", pa.int32()),
        ("pixel_height", pa.int32()),
        ("pixels", pa.large_binary()),
        ("stage", pa.string()),  # "" = ok so far, else the stage that failed
        ("error", pa.string()),
    ]
)
RESULT_SCHEMA = pa.schema(list(FEATURES_SCHEMA) + [pa.field("stage", pa.string()), pa.field("error", pa.string())])


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _decoded_rows(
    batch: pa.Table, max_pixels: int, exif_orientation: bool, detector_sizes: tuple[int, int] | None
) -> Iterator[dict[str, Any]]:
    """Input rows → DECODED_SCHEMA row dicts, one image in memory at a time (see read_and_decode)."""
    for row in batch.to_pylist():
        out = {**row, "width": 0, "height": 0, "pixel_width": 0, "pixel_height": 0, "pixels": b"", "stage": "", "error": ""}
        try:
            data = read_uri(row["source"], attempts=READ_ATTEMPTS)
        except (PermissionError, IsADirectoryError) as exc:  # there but not ours to read: a re-run repeats it
            yield {**out, "stage": "access", "error": _message(exc)}
            continue
        except Exception as exc:  # one unreadable object must not fail the block
            yield {**out, "stage": "read", "error": _message(exc)}
            continue
        try:
            image = decode_image(data, max_pixels, exif_orientation=exif_orientation)
        except Exception as exc:
            yield {**out, "stage": "decode", "error": _message(exc)}
            continue
        del data
        height, width = image.shape[:2]
        if detector_sizes is not None and shipping_size(width, height, *detector_sizes) != (width, height):
            image = resize_for_detector(image, *detector_sizes)
        yield {**out, "height": height, "width": width, "pixel_height": image.shape[0],
               "pixel_width": image.shape[1], "pixels": image.tobytes()}


def read_and_decode(
    batch: pa.Table, max_pixels: int, exif_orientation: bool = True, detector_sizes: tuple[int, int] | None = None
) -> pa.Table:
    """Input rows → one table of DECODED_SCHEMA rows; a failing row gets stage read/access/decode and its reason.
    exif_orientation: the detector's (decode.decode_image). detector_sizes: (test_min_size, test_max_size) of a
    torchvision_c4 detector, whose resize then happens here (decode.shipping_size), so the pixels shipped to the
    actors are the detector's input, not the full-resolution image."""
    return pa.Table.from_pylist(list(_decoded_rows(batch, max_pixels, exif_orientation, detector_sizes)),
                                schema=DECODED_SCHEMA)


def decode_blocks(
    batch: pa.Table, max_pixels: int, block_bytes: int, exif_orientation: bool = True,
    detector_sizes: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """The decode task: read_and_decode, yielding a block as soon as its pixels reach `block_bytes`, so a task
    holds at most about block_bytes plus one image whatever the photos' size (a bucket of 20 MP originals gives
    blocks of a few images, one of thumbnails blocks of the whole batch). Ray Data passes each yielded table
    downstream as its own block."""
    rows: list[dict[str, Any]] = []
    size = 0
    for row in _decoded_rows(batch, max_pixels, exif_orientation, detector_sizes):
        rows.append(row)
        size += len(row["pixels"])
        if size >= block_bytes:
            yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
            rows, size = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _failed_row(row: dict[str, Any], stage: str, error: str) -> dict[str, Any]:
    return {
        **{name: [] for name in FEATURES_SCHEMA.names},
        "image_id": row["image_id"],
        "source": row["source"],
        "width": row["width"],
        "height": row["height"],
        "detector": "",
        "stage": stage,
        "error": error,
    }


class DetectorActor:
    """The detector stage: one detector per actor, called on batches of DECODED_SCHEMA rows → RESULT_SCHEMA rows."""

    def __init__(self, section: dict[str, Any]) -> None:
        self.detector = build_detector(DetectorSection.model_validate(section))

    def _detect_one(self, image: np.ndarray, boxes: np.ndarray | None) -> Detections:
        return self.detector.detect([image], [boxes])[0]

    @staticmethod
    def _to_original(found: Detections | Exception, row: dict[str, Any]) -> Detections | Exception:
        """Boxes of an image shipped at detector size → original pixels, with the detector's own rescale (the
        same ratios it applies to a full-size input, so the numbers are identical)."""
        shipped, original = (row["pixel_height"], row["pixel_width"]), (row["height"], row["width"])
        if isinstance(found, Exception) or shipped == original:
            return found
        import torch

        from mengzi_ray.features.detectors.torchvision_c4 import rescale_boxes

        found.boxes = rescale_boxes(torch.from_numpy(found.boxes), shipped, original).numpy()
        return found

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ok = [r for r in rows if not r["stage"]]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["pixel_height"], r["pixel_width"], 3) for r in ok]
        boxes = [np.asarray(json.loads(r["boxes_json"]), np.float32) if r["boxes_json"] else None for r in ok]
        try:
            found: list[Detections | Exception] = list(self.detector.detect(images, boxes))
        except Exception:  # find out which image failed: run them one by one
            found = []
            for image, given in zip(images, boxes):
                try:
                    found.append(self._detect_one(image, given))
                except Exception as exc:
                    found.append(exc)
        by_id = {r["image_id"]: self._to_original(d, r) for r, d in zip(ok, found)}
        out = []
        for row in rows:
            result = by_id.get(row["image_id"])
            if row["stage"]:
                out.append(_failed_row(row, row["stage"], row["error"]))
                continue
            try:
                if isinstance(result, Exception):
                    raise result
                if row["labels_json"]:
                    result.labels = json.loads(row["labels_json"])
                    if len(result.labels) != len(result.boxes):
                        raise ValueError(f"{len(result.labels)} manifest labels for {len(result.boxes)} boxes")
                feature = detections_to_row(
                    result, image_id=row["image_id"], source=row["source"], width=row["width"],
                    height=row["height"], detector=self.detector.name,
                )
                out.append({**feature, "stage": "", "error": ""})
            except Exception as exc:
                out.append(_failed_row(row, "detect", _message(exc)))
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


# storage/read failures (throttling, a reset, an object not there yet); access (no permission), decode and detect
# failures repeat on a re-run until someone changes the input
TRANSIENT_STAGES = frozenset({"read"})
READ_ATTEMPTS = 3


def _parts(fs: pafs.FileSystem, directory: str) -> list[str]:
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))


def scan_output(output: str, quarantine: bool = True) -> tuple[set[str], dict[str, str], list[str]]:
    """(image_ids in features/, {image_id: stage} of errors/, torn files) of a dataset (empty when it does not
    exist yet). A file whose Parquet footer or image_id column does not read (a write torn by a crash of an older
    version, or a copy cut short) is reported and, with `quarantine`, moved to <output>/quarantine/, so neither
    this job nor training or evaluation trips over it; its images are then extracted again."""
    fs, root = storage.filesystem_for(output)
    root = root.rstrip("/")
    done: set[str] = set()
    failed: dict[str, str] = {}
    torn: list[str] = []
    for part in ("features", "errors"):
        for path in _parts(fs, f"{root}/{part}"):
            try:
                with fs.open_input_file(path) as f:
                    table = pq.read_table(f, columns=["image_id"] if part == "features" else ["image_id", "stage"])
            except (pa.ArrowException, OSError) as exc:
                torn.append(path)
                log.warning("%s: unreadable Parquet part (%s)%s", path, str(exc)[:200],
                            ", moved to quarantine/" if quarantine else "")
                if quarantine:
                    storage.publish_file(fs, path, f"{root}/quarantine/{path[len(root) + 1:]}")
                continue
            if part == "features":
                done.update(table.column("image_id").to_pylist())
            else:
                failed.update(zip(table.column("image_id").to_pylist(), table.column("stage").to_pylist()))
    return done, failed, torn


def existing_ids(output: str) -> set[str]:
    """image_ids already in <output>/features and <output>/errors (torn files skipped and reported, see
    scan_output; empty when the dataset does not exist yet)."""
    done, failed, _ = scan_output(output, quarantine=False)
    return done | set(failed)


def _to_retry(failed: dict[str, str], mode: str) -> set[str]:
    if mode == "all":
        return set(failed)
    if mode == "transient":
        return {image_id for image_id, stage in failed.items() if stage in TRANSIENT_STAGES}
    return set()


def drop_error_rows(output: str, image_ids: set[str]) -> None:
    """Remove the rows of `image_ids` from errors/ before they are tried again: each part that holds one is
    rewritten under a staging name and moved over the original, so an id is never in errors/ and features/ at
    once, and one that a crash leaves in neither is simply extracted on the next run."""
    if not image_ids:
        return
    fs, root = storage.filesystem_for(output)
    root = root.rstrip("/")
    wanted = pa.array(sorted(image_ids), pa.string())
    for path in _parts(fs, f"{root}/errors"):
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        hit = pc.is_in(table.column("image_id"), value_set=wanted)
        if not pc.any(hit).as_py():
            continue
        kept = table.filter(pc.invert(hit))
        if len(kept) == 0:
            fs.delete_file(path)
            continue
        staged = f"{root}/_staging/rewrite-{uuid.uuid4().hex}.parquet"
        fs.create_dir(staged.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(staged) as out:
            pq.write_table(kept, out)
        storage.publish_file(fs, staged, path)


def _features_only(batch: pa.Table, layout: str = "nested") -> pa.Table:
    return to_layout(batch.filter(pc.equal(batch["stage"], "")).select(FEATURES_SCHEMA.names).cast(FEATURES_SCHEMA), layout)


def _errors_only(batch: pa.Table, job_id: str) -> pa.Table:
    failed = batch.filter(pc.not_equal(batch["stage"], ""))
    table = failed.select(["source", "image_id", "stage", "error"])
    table = table.append_column("job_id", pa.array([job_id] * len(table), pa.string()))
    transient = pc.is_in(table.column("stage"), value_set=pa.array(sorted(TRANSIENT_STAGES), pa.string()))
    return table.append_column("transient", transient).cast(ERRORS_SCHEMA)


def _detector_sizes(section: DetectorSection) -> tuple[int, int] | None:
    """(test_min_size, test_max_size) when the decode tasks may resize for the detector: only torchvision_c4, whose
    resize rule decode.py implements (given_boxes maps manifest boxes from the shipped image, so it gets originals)."""
    return (section.test_min_size, section.test_max_size) if section.backend == "torchvision_c4" else None


# feature bytes per written Parquet part: the write stage buffers this much (not the whole chunk) before a file
PART_BYTES = 64 << 20


def write_parts(batch: pa.Table, output: str, staging: str, layout: str, job_id: str) -> pa.Table:
    """Write task: RESULT_SCHEMA rows → <staging>/features/<name>.parquet (the detected rows, in `layout`) and
    <staging>/errors/<name>.parquet (the failed ones). <name> is the job id and a hash of the batch's image_ids, so a task that
    Ray retries overwrites its own files instead of adding a second copy. `staging` is a path inside `output`'s
    filesystem. Returns {image_id, stage, part} per input row, part = the file (relative to staging) it went to."""
    fs, _ = storage.filesystem_for(output)
    ids = batch.column("image_id").to_pylist()
    name = f"{job_id}-{hashlib.sha1(chr(10).join(sorted(ids)).encode('utf-8')).hexdigest()[:24]}.parquet"
    ok = pc.equal(batch["stage"], "")
    features, errors = _features_only(batch, layout), _errors_only(batch, job_id)
    if len(features):
        fs.create_dir(f"{staging}/features", recursive=True)
        write_features(features, f"{staging}/features/{name}", fs)
    if len(errors):
        fs.create_dir(f"{staging}/errors", recursive=True)
        with fs.open_output_stream(f"{staging}/errors/{name}") as out:
            pq.write_table(errors, out)
    parts = pc.if_else(ok, pa.scalar(f"features/{name}"), pa.scalar(f"errors/{name}"))
    return pa.table({"image_id": batch["image_id"], "stage": batch["stage"], "part": parts})


def run_chunk(card: ExtractCard, rows: list[dict[str, Any]], job_id: str, actor_cls: type = DetectorActor) -> dict:
    """Extract one chunk of inputs and add its rows to features/ and errors/, streaming: decode tasks yield blocks
    of at most card.input.block_bytes pixels, the detector actors take card.actors.batch_size images per call, and
    write tasks put about PART_BYTES of features per file under <output>/_staging/<job>-<uuid>/, so memory is
    bounded by those sizes, not by the chunk's. Only when every input is accounted for is each file moved into
    place (storage.publish_file), so a crash mid-write leaves no torn file where readers look.
    Returns {done, failed: {stage: n}}.

    actor_cls: the detector stage's callable class (tests pass a subclass that injects failures).
    """
    import ray.data

    fs, root = storage.filesystem_for(card.output)
    root = root.rstrip("/")
    staging = f"{root}/_staging/{job_id}-{uuid.uuid4().hex[:8]}"
    blocks = max(1, math.ceil(len(rows) / card.input.rows_per_block))
    decoded = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        decode_blocks, fn_kwargs={"max_pixels": card.input.max_pixels, "block_bytes": card.input.block_bytes,
                                  "exif_orientation": card.detector.exif_orientation,
                                  "detector_sizes": _detector_sizes(card.detector)},
        batch_format="pyarrow", batch_size=card.input.rows_per_block, num_cpus=card.input.decode_num_cpus,
        compute=ray.data.TaskPoolStrategy(size=math.ceil(card.input.decode_tasks_per_actor * card.actors.max_size)),
    )
    results = decoded.map_batches(
        actor_cls,
        fn_constructor_kwargs={"section": card.detector.model_dump()},
        compute=ray.data.ActorPoolStrategy(min_size=card.actors.min_size, max_size=card.actors.max_size),
        num_cpus=card.actors.num_cpus,
        num_gpus=card.actors.num_gpus or None,
        batch_size=card.actors.batch_size,
        batch_format="pyarrow",
    )
    rows_per_part = max(1, PART_BYTES // (card.detector.max_boxes * REGION_DIM * 4))
    written = results.map_batches(
        write_parts, fn_kwargs={"output": card.output, "staging": staging, "layout": card.feature_layout,
                                "job_id": job_id},
        batch_format="pyarrow", batch_size=rows_per_part, num_cpus=card.input.decode_num_cpus,
        compute=ray.data.TaskPoolStrategy(size=card.actors.max_size),  # at most max_size × PART_BYTES buffered
    )
    stages = pa.concat_tables(list(written.iter_batches(batch_size=None, batch_format="pyarrow")))
    if len(stages) != len(rows) or set(stages.column("image_id").to_pylist()) != {r["image_id"] for r in rows}:
        raise JobFailed(f"chunk of {len(rows)} inputs produced {len(stages)} rows: refusing to write it")
    counts = {s: 0 for s in STAGES}
    for stage in stages.column("stage").to_pylist():
        if stage:
            counts[stage] = counts.get(stage, 0) + 1
    parts = set(stages.column("part").to_pylist())
    for part in sorted(parts, key=lambda name: (not name.startswith("features/"), name)):  # features first
        storage.publish_file(fs, f"{staging}/{part}", f"{root}/{part}")
    fs.delete_dir(staging)
    return {"done": len(rows) - sum(counts.values()), "failed": counts}


def run_extract(card: ExtractCard, actor_cls: type = DetectorActor) -> dict[str, Any]:
    """The extract job (see module docstring). Returns and writes <output>/summary.json:
    {job_id, inputs, skipped, processed, done, failed: {read, decode, detect}, failed_total, seconds,
    images_per_s, retried (error rows tried again per card.retry_failed), quarantined (torn files moved aside),
    output}; summary.json is written last, atomically. Raises JobFailed (after writing) when failed_total / processed > max_error_fraction."""
    from mengzi_ray.ray_runtime import ensure_ray

    # an imported detector dir's settings (decode's EXIF handling included) apply from here on, read once
    card = card.model_copy(update={"detector": resolve_detector(card.detector)})
    ensure_ray(card.ray)
    job_id = card.job_id or f"extract-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    inputs = list_inputs(card.input)
    fs, root = storage.filesystem_for(card.output)
    staging = f"{root.rstrip('/')}/_staging"
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir(staging)  # an earlier run's unpublished chunk: redone below
    done_ids, failed_ids, torn = scan_output(card.output)
    retry = _to_retry(failed_ids, card.retry_failed)
    drop_error_rows(card.output, retry)
    present = done_ids | (set(failed_ids) - retry)
    todo = [r for r in inputs if r["image_id"] not in present]
    start = time.perf_counter()
    done, failed = 0, {s: 0 for s in STAGES}
    for first in range(0, len(todo), card.chunk_size):
        chunk = run_chunk(card, todo[first : first + card.chunk_size], job_id, actor_cls)
        done += chunk["done"]
        for stage, n in chunk["failed"].items():
            failed[stage] = failed.get(stage, 0) + n
        log.info("extract %s: %d/%d inputs processed", job_id, first + len(todo[first : first + card.chunk_size]),
                 len(todo))
    if fs.get_file_info(staging).type == pafs.FileType.Directory:
        fs.delete_dir(staging)
    seconds = time.perf_counter() - start
    failed_total = sum(failed.values())
    summary = {
        "job_id": job_id,
        "inputs": len(inputs),
        "skipped": len(inputs) - len(todo),
        "processed": len(todo),
        "done": done,
        "failed": failed,
        "failed_total": failed_total,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0,
        "retried": len(retry),
        "quarantined": torn,
        "output": card.output,
    }
    storage.write_json(f"{card.output.rstrip('/')}/summary.json", summary)
    if todo and failed_total / len(todo) > card.max_error_fraction:
        raise JobFailed(
            f"extract {job_id}: {failed_total} of {len(todo)} inputs failed ({failed}), above max_error_fraction="
            f"{card.max_error_fraction}; see {card.output}/errors"
        )
    return summary
