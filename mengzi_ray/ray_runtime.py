"""Joining or starting Ray for a job's driver; called by job functions, never at import time."""

from __future__ import annotations

import logging
import os

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
    ray.init(address="local", num_cpus=section.num_cpus)
