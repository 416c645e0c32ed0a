"""The evaluate job card: `mengzi-ray evaluate --config jobs/eval_*.yaml` → :func:`mengzi_ray.evaluation.jobs.run_evaluate`.

One card, two tasks:

* ``task: caption`` — caption every image of the reference split with beam search on Ray Data model actors, write
  predictions (Parquet; optionally the original's ``pred.*.tsv``), score them (BLEU-1..4, METEOR, ROUGE-L,
  CIDEr; character and jieba tokenisation) and write ``metrics.json`` + ``report.md`` + ``examples.png``.
* ``task: retrieval`` — score image × caption pairs with the match classifier across Ray actors and report
  i2t/t2i R@1/5/10 (``mode: cross``, the full N × N·k ranking) or i2t R@K over candidate lists (``mode: rerank``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mengzi_ray.config import Card, RaySection, Section


class ActorsSection(Section):
    """The model actors that run inference (caption beam search or pair scoring)."""

    num_actors: int = Field(2, ge=1, description="model actors (each loads the model once)")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0 = CPU)")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per actor")
    batch_size: int = Field(32, ge=1, description="images (caption) or pairs (retrieval) per forward pass")


class CaptionEvalSection(Section):
    """Decoding and scoring of the caption task."""

    num_beams: int = Field(5, ge=1, description="beam width (Mengzi-Oscar: 5)")
    max_gen_length: int = Field(20, ge=3, description="caption budget incl. [CLS]/[SEP] (Mengzi-Oscar: 20)")
    tokenizations: list[Literal["char", "jieba", "aic_icc"]] = Field(
        default_factory=lambda: ["char", "jieba"],
        min_length=1,
        description="metric tokenisations: char (Oscar-native), jieba (word level, kit-like), aic_icc (the AIC-ICC "
        "kit's exact protocol: jieba + PTB tokenizer; needs Java; an empty prediction rejects the set)",
    )
    metrics: list[Literal["Bleu", "METEOR", "ROUGE_L", "CIDEr"]] = Field(
        default_factory=lambda: ["Bleu", "METEOR", "ROUGE_L", "CIDEr"], min_length=1
    )
    predictions: str | None = Field(
        None, description="score this predictions file (Parquet or pred tsv) instead of running inference"
    )
    write_pred_tsv: bool = Field(False, description="also write the original's pred.<data>.<split>.beamB.maxL.tsv")
    num_examples: int = Field(6, ge=0, description="images drawn with their captions in examples.png (0: none)")


class RetrievalEvalSection(Section):
    """Gallery and pair scoring of the retrieval task."""

    mode: Literal["cross", "rerank"] = Field(
        "cross", description="cross: every image × every caption (N × N·k); rerank: per-image candidate lists"
    )
    num_images: int | None = Field(None, ge=1, description="first N images of the split (AIC-ICC 1k: 1000)")
    image_keys: str | None = Field(None, description="text file, one image_id a line: the gallery (overrides order)")
    captions_per_image: int = Field(5, ge=1, description="k: first k captions of each image (fewer is an error)")
    candidates: str | None = Field(
        None, description="rerank mode: JSON {image_id: [[image_id, caption_index], ...]} candidate pairs"
    )
    chunk_size: int = Field(4096, ge=1, description="pairs per actor task; a multiple of actors.batch_size")
    att_mask_type: Literal["CLR", "CL", "CR", "LR"] = Field(
        "CLR", description="attention mask: the model dir's is used; a value set here that differs is refused"
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    two_stage_candidates: list[int] = Field(
        default_factory=lambda: [20, 100], description="cross mode: shortlist sizes whose two-stage R@K (first-stage "
        "shortlist, cross-encoder re-rank) is reported for TF-IDF and, in dirs that have one, the dual encoder")


class ModelLayoutSection(Section):
    """The model's input layout, for an original dir that records none (no training_args.bin). A dir that records
    its layout (config.json, training_args.bin) is evaluated with it; a value set here that differs is refused."""

    max_seq_a_length: int | None = Field(None, ge=1, description="caption budget A the model was trained with")
    max_seq_length: int | None = Field(None, ge=3, description="text length L")
    max_img_seq_length: int | None = Field(None, ge=1, description="regions R (e.g. 70 for Mengzi's retrieval)")
    add_od_labels: bool | None = None
    tag_map: Literal["corrected", "langboat"] | None = Field(None, description="tag map of the od labels")


class EvaluateCard(Card):
    """Evaluate a model dir on a feature dataset against references."""

    task: Literal["caption", "retrieval"]
    model_dir: str = Field(..., description="model dir (config.json + model.safetensors + vocab.txt), local or s3://")
    features: str = Field(..., description="region-feature Parquet dataset (file or dir), local or s3://")
    references: str = Field(
        ..., description="text jsonl (image_id, text, kind, split) or COCO captions json (annotations)"
    )
    split: str | None = Field("val", description="split of a text jsonl to evaluate (ignored for COCO json)")
    output_dir: str = Field(..., description="where metrics.json, predictions and the report go (local dir)")
    ray: RaySection = Field(default_factory=RaySection)
    actors: ActorsSection = Field(default_factory=ActorsSection)
    caption: CaptionEvalSection = Field(default_factory=CaptionEvalSection)
    retrieval: RetrievalEvalSection = Field(default_factory=RetrievalEvalSection)
    model_layout: ModelLayoutSection = Field(default_factory=ModelLayoutSection)

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluateCard":
        r = self.retrieval
        if self.task == "retrieval" and r.chunk_size % self.actors.batch_size:
            raise ValueError(
                f"retrieval.chunk_size ({r.chunk_size}) must be a multiple of actors.batch_size "
                f"({self.actors.batch_size}) so that every pair is scored in the same batch whatever the chunking"
            )
        if self.task == "retrieval" and (r.mode == "rerank") != (r.candidates is not None):
            raise ValueError("retrieval.candidates is required with mode rerank and only allowed with it")
        return self
