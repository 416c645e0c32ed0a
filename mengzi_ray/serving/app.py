"""The Serve application builder: `import_path: mengzi_ray.serving.app:build_app` in serve/config.yaml.

`serve run serve/config.yaml` (local) and `serve deploy serve/config.yaml` (cluster) both call `build_app` with
the YAML's `args`, validated as `ServeAppConfig` before anything starts. Tests call `compose_app` with
a config made from tmp paths.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from ray.serve import Application

from mengzi_ray.features.detectors.detector_dir import resolve_detector
from mengzi_ray.serving.api import Api
from mengzi_ray.serving.deployments import Captioner, Detector, Retriever
from mengzi_ray.serving.settings import ServeAppConfig


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
        resolve_detector(config.detector.model).exif_orientation,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: validates the YAML's `args` as ServeAppConfig (errors name the field), then
    composes the app. (Serve would validate a pydantic-annotated builder itself, but not through the string
    annotations of `from __future__ import annotations`, so the check is explicit.)"""
    return compose_app(ServeAppConfig.model_validate(args))
