"""The `index` job card (jobs/index_*.yaml): embed a feature dataset's images with a retrieval model dir's dual
encoder into an embedding index (index/store.py); and the search section of Serve's retriever (index/search.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from mengzi_ray.config import Card, RaySection, Section


class SearchSection(Section):
    """How Serve's dual-encoder stage finds a query's nearest gallery vectors (index/search.py `build_search`)."""

    method: Literal["exact", "ivf"] = Field(
        "exact", description="exact: one matrix product over every vector; ivf: FAISS IVF-Flat (needs faiss-cpu, "
        "pip install 'mengzi-ray[ann]'), for galleries of about 100,000 and more")
    lists: int | None = Field(None, ge=1, description="ivf: k-means cells per gallery side (None: 4·sqrt(n); at most n/39)")
    probes: int = Field(32, ge=1, description="ivf: cells scanned per query (more: slower, closer to exact; 32 keeps "
                        "~0.9 of a 200-row shortlist in bench_index_search); widened for a shortlist longer than they hold")


class ActorsSection(Section):
    """The embedding actors: a fixed-size Ray Data actor pool (each loads the model once)."""

    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1, description="images per forward pass (fixed shape: see index/embedder.py)")
    rows_per_block: int = Field(256, ge=1, description="images per Ray Data batch handed to an actor")


class IndexCard(Card):
    task: ClassVar[str] = "index"

    ray: RaySection = RaySection()
    model_dir: str = Field(..., description="retrieval model dir with a dual encoder (local or s3://)")
    features: str = Field(..., description="region-feature Parquet dataset (dir or file, local or s3://)")
    output: str | None = Field(None, description="index dir; default: `index` beside the features dir")
    max_images: int | None = Field(None, ge=1, description="index only the first N images of the dataset")
    actors: ActorsSection = ActorsSection()

    def output_uri(self) -> str:
        if self.output:
            return self.output.rstrip("/")
        features = self.features.rstrip("/")
        parent = features.rsplit("/", 2)[0] if features.endswith(".parquet") else features.rsplit("/", 1)[0]
        return f"{parent}/index"
