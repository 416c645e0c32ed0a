"""The index job on local Ray: `mengzi-ray index` embeds a gallery with the dual encoder, a re-run embeds only what
is missing, 1 and 2 actors give bit-identical vectors (equal to in-process embedding), and bad inputs fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mengzi_ray.config import JobFailed, load_card
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.index.card import IndexCard
from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.index.job import run_index
from mengzi_ray.index.search import ExactSearch
from mengzi_ray.index.store import EmbeddingIndex, read_meta
from mengzi_ray.modeling import OscarForRetrieval
from mengzi_ray.text import tag_string
from mengzi_ray.training.card import RetrievalCard
from mengzi_ray.training.jobs import prepare_init

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(features dir, dual-encoder model dir, cross-encoder-only model dir): random-init tiny models."""
    root = tmp_path_factory.mktemp("index")
    ds = write_synthetic_dataset(root / "syn", num_train=4, num_val=37, unique=True)
    dirs = []
    for name, enabled in (("dual", "true"), ("plain", "false")):
        card = load_card(RetrievalCard, JOBS / "retrieval_tiny.yaml", [
            f"data.features={ds.root}/features", f"data.text={ds.text_path}", f"run.storage_path={root}",
            f"retrieval.dual_encoder.enabled={enabled}", "retrieval.dual_encoder.dim=16"])
        init_dir, _ = prepare_init(card, str(root / name))
        overrides = {"dual_encoder_dim": 16 if enabled == "true" else 0}
        dirs.append(OscarForRetrieval.from_pretrained(init_dir, **overrides).save_pretrained(root / f"{name}_model"))
    return ds.root / "features", dirs[0], dirs[1]


def card(features: Path, model: Path, output: Path, **extra) -> IndexCard:
    sets = [f"features={features}", f"model_dir={model}", f"output={output}", "actors.batch_size=8",
            "actors.rows_per_block=10", *(f"{k}={v}" for k, v in extra.items())]
    return load_card(IndexCard, JOBS / "index_tiny.yaml", sets)


def test_index_is_resumable_and_actor_count_invariant(ray_local, gallery, tmp_path: Path) -> None:
    features, model, _ = gallery
    first = run_index(card(features, model, tmp_path / "two", max_images=15, **{"actors.num_actors": 2}))
    assert (first["embedded"], first["skipped"], first["images"]) == (15, 0, 15)
    rest = run_index(card(features, model, tmp_path / "two", **{"actors.num_actors": 2}))
    assert (rest["embedded"], rest["skipped"], rest["images"]) == (26, 15, 41)  # only the missing images
    again = run_index(card(features, model, tmp_path / "two", **{"actors.num_actors": 2}))
    assert again["embedded"] == 0 and again["images"] == 41
    one = run_index(card(features, model, tmp_path / "one", **{"actors.num_actors": 1}))
    assert one["embedded"] == 41
    resumed, single = EmbeddingIndex.load(str(tmp_path / "two")), EmbeddingIndex.load(str(tmp_path / "one"))
    assert resumed.image_ids == single.image_ids and np.array_equal(resumed.vectors, single.vectors)
    assert read_meta(str(tmp_path / "two"))["images"] == 41
    # the index holds what the in-process embedder computes for the same rows
    table = pq.read_table(features, columns=["image_id", "features", "tags"]).sort_by("image_id")
    from mengzi_ray.features.schema import region_arrays

    embedder = DualEmbedder(model, batch_size=8)
    local = embedder.embed_images([(tag_string(t), f) for f, t in zip(region_arrays(table.column("features")),
                                                                       table.column("tags").to_pylist())])
    assert np.array_equal(local, single.vectors)
    hits, scores = ExactSearch(single.vectors).search(local[:3], 2)
    assert hits[:, 0].tolist() == [0, 1, 2] and np.all(scores[:, 0] >= scores[:, 1])


def test_index_refuses_bad_models(ray_local, gallery, tmp_path: Path) -> None:
    features, model, plain = gallery
    with pytest.raises(JobFailed, match="no dual encoder"):
        run_index(card(features, plain, tmp_path / "plain"))
    run_index(card(features, model, tmp_path / "idx", max_images=3))
    other = OscarForRetrieval.from_pretrained(model)
    other.dual.text_proj.bias.data += 1.0
    other_dir = other.save_pretrained(tmp_path / "other")
    with pytest.raises(JobFailed, match="built by other weights"):
        run_index(card(features, other_dir, tmp_path / "idx"))


def test_default_output_is_beside_the_features() -> None:
    assert load_card(IndexCard, JOBS / "index_tiny.yaml").output_uri() == "outputs/synthetic/index"
    c = load_card(IndexCard, JOBS / "index_tiny.yaml", ["features=s3://b/data/features/part-0.parquet"])
    assert c.output_uri() == "s3://b/data/index"
