"""Batch caption inference on Ray Data: feature rows → (image_id, caption, score), beam search in model actors.

Each actor loads the model dir once (:class:`CaptionPredictor`) and captions batches with
:func:`mengzi_ray.modeling.inference.caption_images` (the same decoding path as the demo and validation), in
the test layout the model's :class:`~mengzi_ray.modeling.OscarConfig` records (max_seq_a_length, max_seq_length,
max_img_seq_length, add_od_labels). ``score`` is exp(length-normalised log-prob), the original's ``conf``.
Called by the evaluate job and by ``bench/bench_eval.py``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.evaluation.feature_io import od_label_string, read_feature_dataset
from mengzi_ray.evaluation.references import PREDICTION_SCHEMA
from mengzi_ray.features.layout import region_arrays_of
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import load_tokenizer
from mengzi_ray.modeling.inference import caption_images


def generation_layout(config: OscarConfig, max_gen_length: int) -> CaptionLayout:
    """The test layout of a model: its training layout with a caption budget of ``max_gen_length``."""
    trained = CaptionLayout(
        max_seq_a_length=config.max_seq_a_length,
        max_seq_length=config.max_seq_length,
        max_img_seq_length=config.max_img_seq_length,
        img_feature_dim=config.img_feature_dim,
        add_od_labels=config.add_od_labels,
    )
    return trained.for_generation(max_gen_length)


class CaptionPredictor:
    """A Ray Data model actor: a pyarrow batch of feature rows (image_id, features, tags) → predictions.

    Args:
        model_dir: captioning model dir (local or s3://).
        num_beams: beam width; max_gen_length: caption budget incl. [CLS]/[SEP].
        batch_size: images per ``generate`` call inside the actor.
        use_gpu: put the model on ``cuda`` (the actor must have been given a GPU).
        config_overrides: layout values for a dir that records none (the evaluate card's model_layout).
    """

    def __init__(self, model_dir: str, num_beams: int, max_gen_length: int, batch_size: int, use_gpu: bool,
                 config_overrides: dict[str, Any] | None = None) -> None:
        device = torch.device("cuda" if use_gpu else "cpu")
        self.model = OscarForCaptioning.from_pretrained(model_dir, **(config_overrides or {})).to(device)
        self.tokenizer = load_tokenizer(self.model.source_dir, do_lower_case=self.model.config.do_lower_case)
        layout = generation_layout(self.model.config, max_gen_length)
        self.tensorizer = CaptionTensorizer(self.tokenizer, layout)
        self.num_beams = num_beams
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = zip(batch.column("image_id").to_pylist(), region_arrays_of(batch),
                      batch.column("tags").to_pylist(), batch.column("labels").to_pylist())
        tag_map = self.model.config.tag_map
        records = [ImageRecord(image_id, regions, od_label_string(labels, tags, tag_map), [])
                   for image_id, regions, tags, labels in columns]
        predicted = caption_images(
            self.model, self.tokenizer, self.tensorizer, records, num_beams=self.num_beams, batch_size=self.batch_size
        )
        ids = [r.image_id for r in records]
        return pa.table(
            {
                "image_id": ids,
                "caption": [predicted[i][0] for i in ids],
                "score": [predicted[i][1] for i in ids],
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
) -> pa.Table:
    """Caption ``image_ids`` of the feature dataset ``features`` with ``num_actors`` model actors (Ray must be up).

    Returns a PREDICTION_SCHEMA table in the order of ``image_ids``. Raises ValueError for an empty id list and
    RuntimeError when the dataset yields other images than asked for (a count of each, never a silent subset).
    """
    if not image_ids:
        raise ValueError("no images to caption (empty image id list)")
    from ray.data import ActorPoolStrategy

    dataset = read_feature_dataset(features, image_ids).map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "num_beams": num_beams,
            "max_gen_length": max_gen_length,
            "batch_size": batch_size,
            "use_gpu": num_gpus_per_actor > 0,
            "config_overrides": config_overrides,
        },
        compute=ActorPoolStrategy(min_size=num_actors, max_size=num_actors),
        batch_size=batch_size,
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
