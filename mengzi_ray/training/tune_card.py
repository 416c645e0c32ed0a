"""The tune card (`mengzi-ray tune`): which training card a sweep runs, what it samples, how ASHA stops trials.

Validation of the card alone happens here (pydantic); what needs the training card too is in `tune_checks.py`;
running the sweep is `tune.py`. `trial_card` turns one sampled point into the training card a trial runs.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import Field, model_validator

from mengzi_ray.config import (
    COMMANDS,
    Card,
    ConfigError,
    RaySection,
    RunSection,
    Section,
    apply_overrides,
    load_card,
    validate_card,
)
from mengzi_ray.training.card import metric_mode

Task = Literal["pretrain", "caption", "retrieval"]

TASK_COMMANDS: dict[str, str] = {"pretrain": "pretrain", "caption": "finetune-caption", "retrieval": "finetune-retrieval"}
"""Task → the `mengzi-ray` command whose card class describes its training card."""

SWEPT_FIELDS: dict[str, tuple[str, str]] = {
    "learning_rate": ("optim", "learning_rate"),
    "warmup_steps": ("optim", "warmup_steps"),
    "global_batch_size": ("batch", "global_batch_size"),
}
"""Trial config key → (section, field) of the training card it sets."""


class TrainingRef(Section):
    """The training job every trial runs, as a card file plus `--set`-style overrides."""

    task: Task = Field(..., description="pretrain | caption | retrieval: picks the card class and the metrics")
    card: str = Field(..., min_length=1, description="path of the training job card (YAML)")
    overrides: list[str] = Field(default_factory=list, description="`a.b=value` overrides applied to that card")


class LogRange(Section):
    """A log-uniform range `[min, max)`; both ends positive, `min < max`."""

    min: float = Field(..., gt=0)
    max: float = Field(..., gt=0)

    @model_validator(mode="after")
    def _not_empty_or_inverted(self) -> "LogRange":
        if self.min == self.max:
            raise ValueError(f"empty range: min == max == {self.min:g} (use a single value in the training card)")
        if self.min > self.max:
            raise ValueError(f"inverted range: min {self.min:g} > max {self.max:g}")
        return self


def _distinct_choices(values: list[int] | None, name: str) -> list[int] | None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{name} choices repeat a value: {values}")
    return values


class SearchSection(Section):
    """What each trial samples: lr log-uniformly, optional warmup / global batch choices (uniformly)."""

    learning_rate: LogRange
    warmup_steps: list[int] | None = Field(None, min_length=1, description="choices for optim.warmup_steps")
    global_batch_size: list[int] | None = Field(None, min_length=1, description="choices for batch.global_batch_size")
    num_samples: int = Field(8, ge=1, description="trials in the sweep")
    seed: int = Field(0, description="seed of the sampler: the same card samples the same trials")

    @model_validator(mode="after")
    def _choices_valid(self) -> "SearchSection":
        _distinct_choices(self.warmup_steps, "warmup_steps")
        _distinct_choices(self.global_batch_size, "global_batch_size")
        if any(v < 0 for v in self.warmup_steps or []):
            raise ValueError(f"warmup_steps choices must be >= 0: {self.warmup_steps}")
        if any(v < 1 for v in self.global_batch_size or []):
            raise ValueError(f"global_batch_size choices must be >= 1: {self.global_batch_size}")
        return self

    def choices(self) -> dict[str, list[int]]:
        """The discrete dimensions the card sweeps (key → values)."""
        found = {"warmup_steps": self.warmup_steps, "global_batch_size": self.global_batch_size}
        return {key: values for key, values in found.items() if values}

    def corner_points(self) -> list[dict[str, Any]]:
        """Every choice combination at both lr ends: if all of these make valid training cards, every trial does."""
        keys = list(self.choices())
        lrs = (self.learning_rate.min, self.learning_rate.max)
        combos = itertools.product(lrs, *(self.choices()[key] for key in keys))
        return [dict(zip(["learning_rate", *keys], combo)) for combo in combos]


class SchedulerSection(Section):
    """ASHA on one validation metric; its time axis is the reported training `step`."""

    metric: str = Field(..., description="a metric the task reports, e.g. val_cider, val_loss, val_rsum, val_i2t_R@1")
    grace_period_steps: int | None = Field(
        None, ge=1, description="steps before a trial can be stopped; default: the card's validation.every_steps"
    )
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps the top 1/reduction_factor at each rung")

    @property
    def mode(self) -> Literal["min", "max"]:
        return metric_mode(self.metric)


class TrialResourcesSection(Section):
    """How many trials run at once and what each one holds besides its Train workers (from the training card)."""

    max_concurrent_trials: int = Field(1, ge=1)
    driver_cpus: float = Field(0.1, gt=0, description="CPUs of each trial's driver function (it only waits on fit)")
    controller_failure_limit: int = Field(
        -1, ge=-1, description="worker-group scheduling failures before a trial errors (-1: wait for the autoscaler)"
    )


class TuneCard(Card):
    """`mengzi-ray tune`: a sweep over one training card. `run.max_failures` = retries of a failed trial."""

    ray: RaySection = RaySection()
    training: TrainingRef
    search: SearchSection
    scheduler: SchedulerSection
    resources: TrialResourcesSection = TrialResourcesSection()
    run: RunSection

    @model_validator(mode="after")
    def _finite_retries(self) -> "TuneCard":
        if self.run.max_failures < 0:
            raise ValueError("run.max_failures must be >= 0 for a sweep (a trial retried forever never ends)")
        return self


def training_card_class(task: str) -> type[Card]:
    return COMMANDS[TASK_COMMANDS[task]].card_class()


def load_training_card(ref: TrainingRef) -> Card:
    """Load and validate the training card a sweep names (ConfigError naming that file on any problem)."""
    return load_card(training_card_class(ref.task), ref.card, ref.overrides)


def sweep_training_card(card: TuneCard, training: Card) -> Card:
    """The training card the sweep runs: checkpoints ranked by the swept metric, so each trial keeps the
    checkpoint of its best value (the one the sweep exports if that trial wins)."""
    metric = f"checkpoint.metric={card.scheduler.metric}"
    if card.scheduler.metric not in training.metric_names():
        return training  # check_sweep names the problem
    data = apply_overrides(training.model_dump(mode="json"), [metric, f"checkpoint.mode={card.scheduler.mode}"])
    return validate_card(type(training), data, card.training.card)


def trial_card(task: str, base: dict[str, Any], params: dict[str, Any], source: str = "trial") -> Card:
    """The training card of one trial: `base` (a training card's dict) with the sampled params set."""
    overrides = []
    for key, value in params.items():
        if key not in SWEPT_FIELDS:
            raise ConfigError(f"{source}: unknown swept parameter {key!r}")
        overrides.append(f"{'.'.join(SWEPT_FIELDS[key])}={value!r}")
    return validate_card(training_card_class(task), apply_overrides(base, overrides), source)
