"""The Serve application builder: `import_path: mengzi_ray.serving.app:build_app` in serve/config.yaml.

`serve run serve/config.yaml` (local) and `serve deploy serve/config.yaml` (cluster) both call `build_app` with
the YAML's `args`, validated as `ServeAppConfig` before anything starts. Tests call `compose_app` with
a config made from tmp paths.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from ray.serve import Application

from mengzi_ray.features.detectors.detector_dir import resolve_detector
from mengzi_ray.serving.api import Api
from mengzi_ray.serving.deployments import Captioner, Detector, Retriever
from mengzi_ray.serving.settings import ReplicaSection, ServeAppConfig

log = logging.getLogger("ray.serve")
EPSILON = 1e-6  # fractional CPUs summed in floating point


def source_commit() -> str | None:
    """The git commit of the code being served, when it runs from a checkout (None in a packaged install)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def compose_app(config: ServeAppConfig, *, ingress_runtime_env: dict[str, Any] | None = None) -> Application:
    """Bind Api(Detector, Captioner, Retriever) with each deployment's replicas, resources and batching.

    ingress_runtime_env: e.g. {"env_vars": {...}} for the ingress replicas (tests give it the auth token there).
    """
    detector = resolve_detector(config.detector.model)
    ingress_options = config.ingress.deployment_options()
    if ingress_runtime_env:
        ingress_options["ray_actor_options"]["runtime_env"] = ingress_runtime_env
    return Api.options(**ingress_options).bind(
        Detector.options(**config.detector.deployment_options()).bind(config.detector),
        Captioner.options(**config.captioner.deployment_options()).bind(config.captioner),
        Retriever.options(**config.retriever.deployment_options()).bind(config.retriever),
        config.limits,
        config.default_num_beams,
        config.auth_token_env,
        source_commit(),
        config.allow_anonymous,
        # uploads are decoded the way the detector's weights expect (an imported VinVL dir: no EXIF rotation)
        detector.exif_orientation,
        # a detector that resizes anyway lets the ingress decode large JPEGs reduced (given boxes: full size)
        None if detector.backend == "given_boxes" else (detector.test_min_size, detector.test_max_size),
    )


def deployments(config: ServeAppConfig) -> list[tuple[str, ReplicaSection]]:
    """(deployment name, its section) in the order Serve starts them."""
    return [("Api", config.ingress), ("Detector", config.detector), ("Captioner", config.captioner),
            ("Retriever", config.retriever)]


def unfit_deployment(config: ServeAppConfig, nodes: list[dict[str, float]]) -> str | None:
    """One line naming the first deployment whose min_replicas cannot be placed on `nodes` (each node's CPU/GPU
    totals, as `ray.nodes()` reports them), or None when all fit. Serve itself would wait forever for such a
    replica, printing only that it has not been scheduled. Replicas are packed first-fit in start order."""
    free = [{"CPU": n.get("CPU", 0.0), "GPU": n.get("GPU", 0.0)} for n in nodes]
    total = {k: sum(n[k] for n in free) for k in ("CPU", "GPU")}
    placed: list[str] = []
    for name, section in deployments(config):
        need = {"CPU": section.num_cpus, "GPU": section.num_gpus}
        for replica in range(section.min_replicas):
            node = next((n for n in free if all(n[k] + EPSILON >= need[k] for k in need)), None)
            if node is None:
                short = "GPU" if need["GPU"] > max((n["GPU"] for n in free), default=0.0) + EPSILON else "CPU"
                taken = ", ".join(placed) or "nothing"
                return (f"deployment {name} cannot fit: replica {replica + 1} of min_replicas={section.min_replicas} "
                        f"needs {need[short]:g} {short}, the cluster has {total[short]:g} {short} in {len(free)} "
                        f"node(s) and {taken} already take {total[short] - sum(n[short] for n in free):g}; lower "
                        f"{name.lower() if name != 'Api' else 'ingress'}.num_{short.lower()}s or min_replicas, or "
                        "add resources (ray start --num-cpus)")
            for k in need:
                node[k] -= need[k]
        placed.append(f"{name} ({section.min_replicas} x {section.num_cpus:g} CPU)")
    return None


def check_fit(config: ServeAppConfig) -> None:
    """Refuse (ValueError, one line) or warn, per `resource_check`, when the connected Ray cluster cannot place
    every deployment's min_replicas. Skipped when Ray is not initialised (composing an app without a cluster)."""
    import ray

    if not ray.is_initialized():
        return
    problem = unfit_deployment(config, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    if problem is None:
        return
    if config.resource_check == "refuse":
        raise ValueError(problem)
    log.warning("%s (resource_check: warn, so Serve waits for the cluster to grow)", problem)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: validates the YAML's `args` as ServeAppConfig (errors name the field), checks
    that the cluster can place every deployment, then composes the app. (Serve would validate a
    pydantic-annotated builder itself, but not through the string annotations of `from __future__ import
    annotations`, so the check is explicit.)"""
    config = ServeAppConfig.model_validate(args)
    check_fit(config)
    return compose_app(config)
