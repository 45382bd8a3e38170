"""The Ray Serve application: a FastAPI ingress and an autoscaling Segmenter deployment.

    serve run serve_config.yaml                       (import_path: brainseg_ray.serve.app:app)
    serve run brainseg_ray.serve.app:app model=RUN/model
    brainseg serve --model RUN/model [--host H --port P]

`app` is the application builder: it takes the `args` mapping (a ServeConfig) and binds

    SegmentAPI (ingress: HTTP, decoding, auth, metrics)  ->  Segmenter (the shared Segmenter class;
                                                             its Batcher, autoscaling replicas)

Requests that arrive while a replica's model is busy wait in its Batcher (serve/batcher.py) and
share the next forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from brainseg_ray.config import ServeConfig
from brainseg_ray.runtime import gpus_per_actor
from brainseg_ray.serve import settings
from brainseg_ray.serve.api import BackendUnavailable, create_app
from brainseg_ray.serve.batcher import Batcher

SEGMENTER_NAME = "Segmenter"
INGRESS_NAME = "SegmentAPI"
HEALTH_TIMEOUT_S = 2.0  # a replica still loading its model answers no sooner: report "loading"


@serve.deployment(name=SEGMENTER_NAME)
class SegmenterDeployment:
    """One Segmenter per replica; its model is loaded (and run once) before the replica is ready."""

    def __init__(self, cfg: ServeConfig):
        from brainseg_ray.compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # before smp/torchvision, in this replica's process
        from brainseg_ray.inference.segmenter import Segmenter
        from brainseg_ray.serve.metrics import SegmenterMetrics

        # Ray sets OMP_NUM_THREADS=1 in its workers: give torch the CPUs this replica holds.
        threads = cfg.segmenter.threads or max(1, math.floor(cfg.cpus_per_replica))
        # One slice per request: a model's per-patient 3-D post-processing cannot apply here.
        # Idle threads sleep between requests (spin=False) rather than hold the CPUs that the
        # proxy and the ingress need to bring the next requests in.
        self.segmenter = Segmenter(dataclasses.replace(cfg.segmenter, threads=threads, largest_component_3d=False),
                                   s3=cfg.s3, use_gpu=cfg.use_gpu, spin=False)
        self.cfg = cfg
        self.metrics = SegmenterMetrics()
        # Every forward pass on one thread: each new thread calling torch gets its own OpenMP team,
        # and idle teams spinning beside the working one slowed a 2-core machine by half.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segmenter")
        self._batcher = Batcher(self._segment_batch, self._compute, cfg.max_batch_size, cfg.batch_wait_timeout_s)
        size = int(self.segmenter.metadata["input"]["size"])
        warm_up = np.zeros((1, size, size, 3), np.uint8)
        self._compute.submit(self.segmenter.segment, warm_up).result()  # first-call costs before "ready"

    def health(self) -> dict:
        return {"model_version": self.segmenter.version}

    def model_info(self) -> dict:
        seg, opts = self.cfg.segmenter, self.segmenter.options
        return {
            "model_version": self.segmenter.version,
            "artifact": {"uri": seg.model, **self.segmenter.metadata},
            "serving": {
                "threshold": opts.threshold, **self.segmenter.postprocess_settings(),
                "pixel_spacing_mm": opts.pixel_spacing_mm, "overlay_style": seg.overlay_style,
                "precision": self.segmenter.predictor.precision, "device": str(self.segmenter.predictor.device),
                "backend": self.segmenter.predictor.backend,
                "max_batch_size": self.cfg.max_batch_size, "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
                "max_body_mb": self.cfg.max_body_mb,
            },
        }

    async def segment(self, image: np.ndarray, overlay: bool, sent_at: float = 0.0) -> dict:
        """One slice; `sent_at` (time.time() at the ingress) times its way here."""
        arrived = time.time()
        result = await self._batcher.submit((image, overlay, arrived))
        result["timings_ms"]["queue"] = max(0.0, (arrived - sent_at) * 1000) if sent_at else 0.0
        result["replied_at"] = time.time()
        return result

    def _segment_batch(self, requests: list[tuple[np.ndarray, bool, float]]) -> list[dict]:
        """In the compute thread: one forward pass for the requests (image, overlay, arrival)."""
        started_at, started = time.time(), time.perf_counter()
        images, overlays, arrivals = zip(*requests)
        stack = np.stack(images)
        stages: dict[str, float] = {}
        results = self.segmenter.segment(stack, timings=stages)
        drawn = [self.segmenter.overlay(image, r.mask) if want else None
                 for image, r, want in zip(stack, results, overlays)]
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.metrics.observe_batch(len(images), elapsed_ms, sum(r.findings.tumor_present for r in results))
        forward_ms = stages["forward_ms"]
        return [{"findings": r.findings.as_dict(), "mask": r.mask, "overlay": o, "batch_size": len(images),
                 "inference_ms": elapsed_ms, "model_version": self.segmenter.version,
                 "timings_ms": {"batch_wait": max(0.0, (started_at - arrived) * 1000), "forward": forward_ms,
                                "postprocess": elapsed_ms - forward_ms}}
                for r, o, arrived in zip(results, drawn, arrivals)]


class HandleBackend:
    """api.Backend over the Segmenter deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self._model_info: dict | None = None

    async def segment(self, image: np.ndarray, overlay: bool) -> dict:
        from ray.exceptions import RayActorError

        try:
            return await self.handle.segment.remote(image, overlay, time.time())
        except RayActorError:
            pass  # the replica died with this request on it: once more, on another replica
        try:
            return await self.handle.segment.remote(image, overlay, time.time())
        except RayActorError as exc:
            raise BackendUnavailable(f"the model replica was lost: {type(exc).__name__}") from exc

    async def _call(self, method: str) -> dict:
        from ray.exceptions import RayActorError

        response = getattr(self.handle, method).remote()
        try:
            return await asyncio.wait_for(_awaited(response), timeout=HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError as exc:
            response.cancel()
            raise BackendUnavailable("no model replica answered yet (loading or restarting)") from exc
        except RayActorError as exc:
            raise BackendUnavailable(f"the model replica was lost: {type(exc).__name__}") from exc

    async def health(self) -> dict:
        return await self._call("health")

    async def model_info(self) -> dict:
        if self._model_info is None:  # a deployment serves one model for its whole life
            self._model_info = await self._call("model_info")
        return self._model_info


async def _awaited(response):
    return await response


@serve.deployment(name=INGRESS_NAME)
@serve.ingress()
class SegmentAPI:
    def __init__(self, segmenter: DeploymentHandle, cfg: ServeConfig, token: str | None):
        from brainseg_ray.serve.metrics import IngressMetrics

        self.cfg, self.token = cfg, token
        self.backend = HandleBackend(segmenter)
        self.metrics = IngressMetrics()

    def __serve_build_asgi_app__(self):
        # Built in the replica, from this replica's settings (body limit, CORS, token).
        return create_app(self.cfg, self.backend, token=self.token, observe=self.metrics.observe)


def build(cfg: ServeConfig) -> Application:
    """The application for a checked ServeConfig."""
    settings.check(cfg)
    scaling = dataclasses.asdict(cfg.autoscaling)
    gpus = gpus_per_actor(cfg.use_gpu, cfg.gpus_per_replica)
    actor_options: dict = {"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus}
    # The replicas get use_gpu decided: a GPU exactly when Ray gives them one.
    segmenter = SegmenterDeployment.options(
        autoscaling_config=scaling, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options=actor_options,
    ).bind(dataclasses.replace(cfg, use_gpu=gpus > 0))
    # The ingress mostly waits on the Segmenter: no CPU reserved, many requests in flight.
    return SegmentAPI.options(
        num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(segmenter, cfg, settings.resolve_token(cfg))


def app(args: dict) -> Application:
    """Ray Serve application builder (serve_config.yaml's import_path): args -> application."""
    return build(settings.from_args(args))


def start(cfg: ServeConfig) -> str:
    """Start (or reuse) Serve's HTTP proxy on cfg.host:cfg.port, deploy the application and wait
    until it is running; returns its URL. Ray must be initialised."""
    logging_config = {"log_level": cfg.log_level}
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
    serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, logging_config=logging_config)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/"
