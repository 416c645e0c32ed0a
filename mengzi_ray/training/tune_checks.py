"""Checks of a sweep before any trial starts: the card against its training card, and against the cluster.

Called by `tune.run_tune`; each raises ConfigError naming the field (a capacity shortfall on an autoscaling
cluster is only logged).
"""

from __future__ import annotations

import logging

from mengzi_ray.config import Card, ConfigError
from mengzi_ray.training.tune_card import TuneCard, trial_card

log = logging.getLogger(__name__)


def check_sweep(card: TuneCard, training: Card) -> None:
    """Everything that can be known wrong before a trial starts: raises ConfigError naming the field.

    The metric must be one the task's validation reports; every choice combination at both lr ends must make a
    valid training card (e.g. no global batch that per-worker batch × workers does not divide); the ASHA grace
    period must fit in the run.
    """
    source = f"tune card ({card.training.card})"
    validated = [m for m in training.metric_names() if m.startswith("val_")]
    if card.scheduler.metric not in validated:
        raise ConfigError(
            f"{source}: scheduler.metric {card.scheduler.metric!r} is not reported by {card.training.task} "
            f"training (its validation reports {', '.join(validated)})"
        )
    for point in card.search.corner_points():
        trial_card(card.training.task, training.model_dump(), point, f"{source}, search point {point}")
    max_steps = training.schedule.max_steps
    grace = card.scheduler.grace_period_steps or training.validation.every_steps
    if grace > max_steps:
        raise ConfigError(f"{source}: scheduler.grace_period_steps {grace} > the card's schedule.max_steps {max_steps}")


def check_capacity(card: TuneCard, training: Card, cluster_cpus: float, embedded: bool) -> None:
    """Concurrent trials must fit the cluster, or their worker groups wait on each other forever."""
    per_trial = training.scaling.num_workers * training.scaling.cpus_per_worker + card.resources.driver_cpus
    need = card.resources.max_concurrent_trials * per_trial
    if need <= cluster_cpus:
        return
    message = (
        f"resources.max_concurrent_trials {card.resources.max_concurrent_trials} × {per_trial:g} CPUs per trial "
        f"(workers × cpus_per_worker + driver_cpus) = {need:g} > the cluster's {cluster_cpus:g} CPUs"
    )
    if embedded:
        raise ConfigError(message)
    log.warning("%s: trials will wait for the autoscaler", message)
