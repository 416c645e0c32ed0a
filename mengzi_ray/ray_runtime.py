"""Joining or starting Ray for a job's driver; called by job functions, never at import time."""

from __future__ import annotations

import logging
import os
from typing import Any

from mengzi_ray.config import RaySection

log = logging.getLogger(__name__)


def ensure_ray(section: RaySection | None = None) -> None:
    """Make sure this process is a Ray driver.

    Order: an already-initialised Ray (a test or a notebook started one) is used as is; an explicit
    `section.address` or the `RAY_ADDRESS` set by `ray job submit` is joined; otherwise an embedded Ray is
    started with `address="local"` (never silently attaching to some other cluster on the machine).
    """
    import ray

    if ray.is_initialized():
        return
    section = section or RaySection()
    address = section.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        log.info("joining Ray at %s", address)
        ray.init(address=address)
        return
    log.info("starting an embedded Ray (num_cpus=%s)", section.num_cpus)
    start_local_ray(section.num_cpus)


def start_local_ray(
    num_cpus: float | None, include_dashboard: bool | None = None, attempts: int = 3, **init_kwargs: Any
) -> Any:
    """`ray.init(address="local", ...)`, tried up to `attempts` times: on a loaded machine the raylet can miss Ray's
    fixed start-up waits ("node timed out during startup"), and a fresh start then passes. The last error is
    raised when every attempt failed. `init_kwargs` go to ray.init as they are (console.quiet_ray's); returns
    ray.init's RayContext (`address_info["session_dir"]` holds the session's logs/)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard, **init_kwargs)
        except Exception:
            ray.shutdown()  # what a half-started node left behind
            if attempt == attempts:
                raise
            log.warning("embedded Ray did not start (attempt %d of %d); trying again", attempt, attempts)
