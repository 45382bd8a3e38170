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
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": cfg.log_to_driver}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False


def job_uses_gpu(use_gpu: bool | None) -> bool:
    """A job's use_gpu setting decided: true or false as given; None: whether the cluster has a
    GPU now (none while Ray is not started, as when `serve run MODULE:app` builds the app)."""
    if use_gpu is not None:
        return use_gpu
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def gpus_per_actor(use_gpu: bool | None, share: float = 1.0) -> float:
    """The GPUs each actor, replica or worker asks Ray for: `share` of one when the job uses a GPU
    (job_uses_gpu), else 0. The actor's model then goes on the GPU exactly when this is above 0."""
    if not job_uses_gpu(use_gpu):
        return 0.0
    if share <= 0:
        raise ValueError(f"the GPU share per actor must be positive, got {share!r} (use_gpu=false for none)")
    return float(share)


def cpus_per_actor(count: int, asked: float | None = None, *, cap: int | None = None,
                   keep_free: float = 0.0) -> float:
    """CPUs for each of `count` actors or workers of a job: the one policy of every job.

    `asked` (the user's setting) is taken as given, except that with `keep_free` it shrinks until
    that many CPUs stay for the job's other stages (evaluation's read tasks), though never below
    half a CPU. Not asked: the cluster's CPUs, less `keep_free`, shared out in whole CPUs, but never
    more than the largest alive node has (an actor lives on one node; asking for more leaves it
    pending forever on a cluster of small nodes), nor more than `cap`; at least one.
    """
    if asked and not keep_free:
        return float(asked)
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    if asked:
        return max(0.5, min(float(asked), (total - keep_free) / max(count, 1)))
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=total)
    share = int((total - keep_free) // max(count, 1))
    return float(max(1, min(share, int(largest), cap or share)))
