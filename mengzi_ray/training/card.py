"""Training job cards: `pretrain`, `finetune-caption` (cross-entropy or SCST), `finetune-retrieval`.

`TrainCard` holds what every task shares (Ray, scaling, run, data, model init, optimiser, batch, schedule,
validation, checkpoints); the subclasses add the task's input layout and loss settings. Pydantic checks types,
ranges and cross-field rules (batch divisibility, checkpoint cadence) when the card is loaded; what needs the
file system (datasets exist, feature dim) is checked by `jobs.check_inputs` before any worker starts.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mengzi_ray import storage
from mengzi_ray.config import Card, RaySection, RunSection, ScalingSection, Section


class DataSection(Section):
    """Feature rows (Parquet dir or file, local or s3://) ⨝ text rows (jsonl: image_id, text, kind, split)."""

    features: str = Field(..., description="region-feature Parquet dataset (docs/data-contracts.md)")
    text: str = Field(..., description="text rows jsonl: image_id, text, kind, split")
    train_split: str = "train"
    val_split: str = "val"
    kind: Literal["caption", "question", "all"] = Field(
        "caption", description="which text rows are text_a / captions (all: every kind, e.g. an Oscar+ corpus)"
    )
    max_val_images: int = Field(64, ge=2, description="validation images (first N of the val split)")
    cache_in_workers: bool = Field(
        False, description="keep each worker's shard in memory after the first epoch (small datasets only)"
    )
    shuffle_buffer: int = Field(1024, ge=1, description="rows in each worker's local shuffle buffer (with block order randomised per epoch)")


class TinyArchitecture(Section):
    """A random-init BERT trunk with a vocab built from the training texts and tags (tests, demo)."""

    hidden_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TinyArchitecture":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        return self


class ModelSection(Section):
    """Exactly one initialisation: a model dir of ours/the original, a BERT MLM dir, or a tiny random model."""

    init_from: str | None = Field(None, description="model dir (config.json + weights + vocab.txt)")
    from_bert: str | None = Field(None, description="BERT MLM dir (Mengzi-BERT-base) initialising bert.*")
    tiny: TinyArchitecture | None = None
    img_feature_dim: int = Field(2054, ge=1, description="region vector size the features must have")
    use_img_layernorm: bool = True

    @model_validator(mode="after")
    def _one_init(self) -> "ModelSection":
        chosen = [n for n in ("init_from", "from_bert", "tiny") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of init_from, from_bert, tiny (got {chosen or 'none'})")
        return self


class OptimSection(Section):
    learning_rate: float = Field(..., gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    max_grad_norm: float = Field(1.0, description="clip the global grad norm; <= 0 disables clipping")
    amp: bool = Field(True, description="autocast (amp_dtype) on GPU workers; CPU workers run fp32 unless amp_on_cpu")
    amp_dtype: Literal["bfloat16", "float16"] = Field(
        "bfloat16", description="autocast dtype; float16 adds a GradScaler (dynamic loss scaling)"
    )
    amp_on_cpu: bool = Field(False, description="autocast on CPU workers too (CPUs with bf16 units; tests)")
    fused: bool = Field(True, description="fused AdamW kernel where the device has one, else the foreach kernel")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass (memory for compute)"
    )
    compile: bool = Field(False, description="torch.compile the model (dynamic shapes) before the first step")
    compile_backend: str = Field("inductor", description="torch.compile backend (aot_eager: graph capture, no codegen)")
    seed: int = 88


class BatchSection(Section):
    """The card states the global batch, as the original does; accumulation makes up the difference."""

    global_batch_size: int = Field(..., ge=1)
    per_worker_batch_size: int = Field(..., ge=1)


class ScheduleSection(Section):
    max_steps: int = Field(..., ge=1, description="optimizer steps (the original's epochs × steps per epoch)")


class ValidationSection(Section):
    every_steps: int = Field(..., ge=1, description="validate (and report) every N optimizer steps and at the end")
    batch_size: int = Field(32, ge=1)


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Losses are minimised; accuracies, recalls and CIDEr maximised."""
    return "min" if metric.endswith("loss") else "max"


class CheckpointSection(Section):
    every_steps: int | None = Field(None, ge=1, description="full-state checkpoint cadence; None = every validation")
    num_to_keep: int = Field(2, ge=1, description="K best by `metric` (the latest is always kept too)")
    metric: str = Field(..., description="reported metric to rank checkpoints by, e.g. val_cider")
    mode: Literal["max", "min"] | None = Field(
        None, description="None: from the metric (min for *loss, else max); a mode contradicting it is an error"
    )

    @model_validator(mode="after")
    def _mode_fits_metric(self) -> "CheckpointSection":
        derived = metric_mode(self.metric)
        if self.mode is not None and self.mode != derived:
            raise ValueError(
                f"checkpoint.mode {self.mode!r} contradicts checkpoint.metric {self.metric!r} ({derived} is better): "
                "it would keep the worst checkpoints"
            )
        self.__dict__["mode"] = derived  # not `self.mode =`: assignment validation would re-enter this validator
        return self


class FaultDrillSection(Section):
    """Inject one worker failure (recovery drills and tests): rank `rank` raises once at optimizer step `at_step`."""

    at_step: int = Field(..., ge=1)
    rank: int = Field(0, ge=0)
    kill: bool = Field(False, description="SIGKILL the worker process instead of raising (a lost worker, not an error)")
    log_ids: bool = Field(
        False, description="every rank appends each micro-batch's (epoch, image_id, texts) to <run dir>/step_ids/rank<r>.jsonl (local run dirs only)"
    )


class TrainCard(Card):
    """What every training task shares."""

    ray: RaySection = RaySection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection
    data: DataSection
    model: ModelSection
    optim: OptimSection
    batch: BatchSection
    schedule: ScheduleSection
    validation: ValidationSection
    checkpoint: CheckpointSection
    fault_drill: FaultDrillSection | None = None

    task: ClassVar[str] = "train"

    @model_validator(mode="after")
    def _consistent(self) -> "TrainCard":
        per_step = self.batch.per_worker_batch_size * self.scaling.num_workers
        if self.batch.global_batch_size % per_step:
            raise ValueError(
                f"batch.global_batch_size {self.batch.global_batch_size} is not divisible by "
                f"batch.per_worker_batch_size × scaling.num_workers = {per_step}"
            )
        if self.optim.warmup_steps > self.schedule.max_steps:
            raise ValueError(f"optim.warmup_steps {self.optim.warmup_steps} > schedule.max_steps {self.schedule.max_steps}")
        every = self.checkpoint.every_steps
        if every is not None and every % self.validation.every_steps:
            raise ValueError(
                f"checkpoint.every_steps {every} must be a multiple of validation.every_steps "
                f"{self.validation.every_steps} (every checkpoint carries the metric it is ranked by)"
            )
        if self.checkpoint.metric not in self.metric_names():
            raise ValueError(f"checkpoint.metric {self.checkpoint.metric!r} is not one of {self.metric_names()}")
        if self.fault_drill and self.fault_drill.rank >= self.scaling.num_workers:
            raise ValueError(f"fault_drill.rank {self.fault_drill.rank} >= scaling.num_workers {self.scaling.num_workers}")
        if self.fault_drill and self.fault_drill.log_ids and storage.is_remote(self.run.storage_path):
            raise ValueError(f"fault_drill.log_ids appends to local files; run.storage_path {self.run.storage_path!r} is not local")
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.batch.global_batch_size // (self.batch.per_worker_batch_size * self.scaling.num_workers)

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoint.every_steps or self.validation.every_steps

    def metric_names(self) -> tuple[str, ...]:
        """Metrics this task reports on validation (what checkpoint.metric may name)."""
        return ("train_loss", "val_loss")


class CaptionSection(Section):
    """Captioning layout and loss (microsoft/Oscar `oscar/run_captioning.py` `CaptionTensorizer`,
    `oscar/modeling/modeling_bert.py` `BertForImageCaptioning`; Oscar/VinVL and Langboat/Mengzi READMEs)."""

    max_seq_a_length: int = Field(40, ge=3)
    max_seq_length: int = Field(70, ge=3)
    max_img_seq_length: int = Field(50, ge=1)
    mask_prob: float = Field(0.15, gt=0, le=1)
    max_masked_tokens: int = Field(3, ge=1)
    add_od_labels: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    drop_worst_ratio: float = Field(0.0, ge=0, lt=1)
    drop_worst_after: int = Field(0, ge=0)
    tie_weights: bool = False
    freeze_embedding: bool = False
    num_beams: int = Field(5, ge=1, description="validation decoding")
    max_gen_length: int = Field(20, ge=2, description="validation decoding, [CLS]/[SEP] included")

    @model_validator(mode="after")
    def _lengths(self) -> "CaptionSection":
        if self.max_seq_a_length > self.max_seq_length:
            raise ValueError(f"max_seq_a_length {self.max_seq_a_length} > max_seq_length {self.max_seq_length}")
        return self


class ScstSection(Section):
    """Self-critical sequence training (microsoft/Oscar `oscar/run_captioning.py` `scst_train_iter`): k sampled
    captions per image, greedy baseline."""

    sample_n: int = Field(5, ge=1)
    baseline: Literal["greedy"] = "greedy"
    temperature: float = Field(1.0, gt=0)


class CaptionCard(TrainCard):
    task: ClassVar[str] = "caption"
    caption: CaptionSection = CaptionSection()
    scst: ScstSection | None = Field(None, description="present: SCST with CIDEr-D reward instead of cross-entropy")

    def metric_names(self) -> tuple[str, ...]:
        return ("train_loss", "val_loss", "val_cider")


class DualEncoderSection(Section):
    """The dual-encoder first stage trained beside the cross-encoder (modeling/dual_encoder.py): per step, the
    cross-encoder loss + contrastive_weight × InfoNCE (both directions, negatives gathered from every worker)
    + distill_weight × KL from the cross-encoder's softmax over [positive, hard negatives] to the dual encoder's
    + cross_rank_weight × the cross-encoder's own listwise CE over those same pairs."""

    enabled: bool = False
    dim: int = Field(256, ge=8, description="embedding size of both sides")
    temperature: float = Field(0.05, gt=0, description="InfoNCE / student temperature")
    contrastive_weight: float = Field(1.0, ge=0)
    distill_weight: float = Field(1.0, ge=0, description="0 turns distillation (and its teacher passes) off")
    hard_negatives: int = Field(3, ge=1, description="negatives per caption the cross-encoder scores (the dual encoder's nearest in the batch and the negative bank)")
    distill_temperature: float = Field(1.0, gt=0, description="temperature on the cross-encoder's match log-odds")
    negative_bank: int = Field(
        0, ge=0, description="image sides of the last N rows this worker trained on, kept with their embeddings, as "
        "extra hard-negative candidates beside the batch (stale vectors, no gradient; host memory ≈ N × regions × "
        "feature dim × 4 bytes); 0: in-batch only")
    cross_rank_weight: float = Field(
        0.0, ge=0, description="weight of a listwise loss that trains the cross-encoder itself on the dual encoder's "
        "hard negatives (softmax CE over its match log-odds of [own image, hard negatives]); 0: Oscar's binary loss only")
    tower: Literal["shared", "separate"] = Field(
        "shared", description="shared: the heads read the cross-encoder's trunk (one model); separate: a trunk copy of "
        "their own (twice the weights; the dual losses never move the cross-encoder)")

    @model_validator(mode="after")
    def _bank_needs_mining(self) -> "DualEncoderSection":
        if self.negative_bank and not (self.distill_weight or self.cross_rank_weight):
            raise ValueError(f"negative_bank {self.negative_bank} would never be read: hard negatives are mined only "
                             "when distill_weight or cross_rank_weight is above 0")
        return self


class RetrievalSection(Section):
    """Retrieval layout (microsoft/Oscar `oscar/run_retrieval.py` `RetrievalDataset`, `compute_ranks`)."""

    max_seq_length: int = Field(70, ge=3)
    max_img_seq_length: int = Field(50, ge=1)
    add_od_labels: bool = True
    att_mask_type: Literal["CLR", "CL", "CR", "LR"] = "CLR"
    val_captions_per_image: int = Field(5, ge=1, description="texts per val image in the cross-image gallery")
    negative_pool_size: int = Field(1024, ge=2, description="recent rows per worker that negatives are drawn from "
                                    "(host memory: rows × max_img_seq_length × feature dim × 4 bytes, ~420 MB at 1024 × 50 × 2054)")
    dual_encoder: DualEncoderSection = DualEncoderSection()


class RetrievalCard(TrainCard):
    task: ClassVar[str] = "retrieval"
    retrieval: RetrievalSection = RetrievalSection()

    def metric_names(self) -> tuple[str, ...]:
        ranks = tuple(f"val_{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
        dual = tuple(f"val_dual_{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)) + ("val_dual_rsum",)
        return ("train_loss", "val_loss", *ranks, "val_rsum", *(dual if self.retrieval.dual_encoder.enabled else ()))


class PretrainSection(Section):
    """Oscar+ pretraining layout (microsoft/Oscar `oscar/datasets/oscar_tsv.py`)."""

    max_seq_length: int = Field(35, ge=4)
    max_img_seq_length: int = Field(50, ge=1)
    mlm_prob: float = Field(0.15, gt=0, le=1)
    texta_false_prob: float = Field(0.25, ge=0, le=1)
    negative_pool_size: int = Field(4096, ge=2, description="recent rows per worker that negatives are drawn from")
    textb_sample_mode: Literal[0, 1] = Field(1, description="polluted text_b: 1 = another document's text_b "
                                             "(Mengzi/VinVL), 0 = a random line (text_a or text_b) of it")


class PretrainCard(TrainCard):
    task: ClassVar[str] = "pretrain"
    pretrain: PretrainSection = PretrainSection()

    def metric_names(self) -> tuple[str, ...]:
        return ("train_loss", "val_loss", "val_mlm_acc")
