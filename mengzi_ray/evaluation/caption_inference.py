"""Batch caption inference on Ray Data: feature rows → (image_id, caption, score), beam search in model actors.

Each actor loads the model dir once as a :class:`mengzi_ray.inference.Captioner` (the same decoding path and
input layout as Serve and validation, read from the dir). ``score`` is exp(length-normalised log-prob), the
original's ``conf``.
Called by the evaluate job and by ``bench/bench_eval.py``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mengzi_ray.evaluation.feature_io import read_feature_dataset
from mengzi_ray.evaluation.references import PREDICTION_SCHEMA
from mengzi_ray.features.layout import region_arrays_of
from mengzi_ray.inference import Captioner

CALLS_PER_TASK = 4
"""`generate` calls of `batch_size` images per Ray Data task: a task's fixed cost (scheduling, the block's trip
to the actor and back) is paid once per this many model batches."""


class CaptionPredictor:
    """A Ray Data model actor: a pyarrow batch of feature rows (image_id, features, tags) → predictions.

    Args:
        model_dir: captioning model dir (local or s3://).
        num_beams: beam width; max_gen_length: caption budget incl. [CLS]/[SEP].
        batch_size: images per ``generate`` call inside the actor (a task brings CALLS_PER_TASK of them).
        use_gpu: put the model on ``cuda`` (the actor must have been given a GPU).
        config_overrides: layout values for a dir that records none (the evaluate card's model_layout).
    """

    def __init__(self, model_dir: str, num_beams: int, max_gen_length: int, batch_size: int, use_gpu: bool,
                 config_overrides: dict[str, Any] | None = None) -> None:
        self.captioner = Captioner.from_model_dir(
            model_dir, "cuda" if use_gpu else "cpu", config_overrides=config_overrides,
            max_gen_length=max_gen_length, batch_size=batch_size,
        )
        self.num_beams = num_beams

    def __call__(self, batch: pa.Table) -> pa.Table:
        od_labels = [self.captioner.od_labels(labels, tags)
                     for labels, tags in zip(batch.column("labels").to_pylist(), batch.column("tags").to_pylist())]
        best = self.captioner.caption(region_arrays_of(batch), od_labels, num_beams=self.num_beams)
        return pa.table(
            {
                "image_id": batch.column("image_id").to_pylist(),
                "caption": [captions[0][0] for captions in best],
                "score": [captions[0][1] for captions in best],
            },
            schema=PREDICTION_SCHEMA,
        )


def predict_captions(
    features: str,
    model_dir: str,
    image_ids: list[str],
    *,
    num_beams: int = 5,
    max_gen_length: int = 20,
    num_actors: int = 1,
    batch_size: int = 32,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    config_overrides: dict[str, Any] | None = None,
    predictor_cls: type[CaptionPredictor] = CaptionPredictor,
) -> pa.Table:
    """Caption ``image_ids`` of the feature dataset ``features`` with ``num_actors`` model actors (Ray must be up);
    ``predictor_cls`` is the actor class (a subclass for instrumentation, e.g. bench/bench_infer_ray.py's timing).

    Returns a PREDICTION_SCHEMA table in the order of ``image_ids``. Raises ValueError for an empty id list and
    RuntimeError when the dataset yields other images than asked for (a count of each, never a silent subset).
    """
    if not image_ids:
        raise ValueError("no images to caption (empty image id list)")
    from ray.data import ActorPoolStrategy

    dataset = read_feature_dataset(features, image_ids).map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "num_beams": num_beams,
            "max_gen_length": max_gen_length,
            "batch_size": batch_size,
            "use_gpu": num_gpus_per_actor > 0,
            "config_overrides": config_overrides,
        },
        compute=ActorPoolStrategy(min_size=num_actors, max_size=num_actors),
        # a multiple of batch_size: the model batches are the same images as in-process, whatever the task size
        batch_size=batch_size * CALLS_PER_TASK,
        batch_format="pyarrow",
        # Setting both num_cpus and num_gpus is "experimental" in Ray Data: a GPU actor asks for GPUs only.
        **({"num_gpus": num_gpus_per_actor} if num_gpus_per_actor > 0 else {"num_cpus": num_cpus_per_actor}),
    )
    parts = [b.cast(PREDICTION_SCHEMA) for b in dataset.iter_batches(batch_format="pyarrow", batch_size=None)]
    return _in_order(pa.concat_tables(parts) if parts else PREDICTION_SCHEMA.empty_table(), image_ids)


def _in_order(table: pa.Table, image_ids: list[str]) -> pa.Table:
    got = table.column("image_id").to_pylist()
    position = {image_id: i for i, image_id in enumerate(got)}
    missing = [i for i in image_ids if i not in position]
    extra = len(got) - (len(image_ids) - len(missing))
    if missing or extra:
        raise RuntimeError(
            f"caption inference returned {len(got)} rows for {len(image_ids)} images: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {extra} unexpected or repeated"
        )
    return table.take([position[i] for i in image_ids])
