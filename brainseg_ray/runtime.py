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


def default_cpus_per_actor(count: int, cap: int | None = None) -> float:
    """CPUs for each of `count` actors or workers when the user gives none: the cluster's CPUs shared
    out, but never more than the largest alive node has (an actor lives on one node; asking for more
    leaves it pending forever on a cluster of small nodes), nor more than `cap`."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=total)
    share = int(total // max(count, 1))
    return float(max(1, min(share, int(largest), cap or share)))
