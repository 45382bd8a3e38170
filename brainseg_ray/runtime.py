"""Starting or joining Ray the same way from every entry point (CLI, jobs, tests)."""

from __future__ import annotations

import logging
import os

from brainseg_ray.config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster named by cfg.address or RAY_ADDRESS (as under `ray job submit`), else start
    a local instance. Does nothing when Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
