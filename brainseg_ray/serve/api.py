"""The HTTP API (FastAPI): requests parsed, answers shaped. The model sits behind a Backend, in
Serve the Segmenter deployment's handle; this module never touches torch.

    POST /v1/segment   one slice (multipart field "file", or the raw body): findings as JSON;
                       ?include=mask,overlay adds base64 PNGs; Accept: image/png answers the overlay
    GET  /v1/health    200 when a Segmenter replica has its model loaded, else 503
    GET  /v1/model     the artifact's metadata and the serving settings
    GET  /openapi.json the OpenAPI document
    GET  /             the web page (static/index.html)
"""

from __future__ import annotations

import base64
import time
from importlib import resources
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware.cors import CORSMiddleware

from brainseg_ray import __version__
from brainseg_ray.config import ServeConfig
from brainseg_ray.rendering import encode_png, mask_png
from brainseg_ray.serve.middleware import ApiError, BearerAuth, BodyLimit, RequestMetrics, error_response
from brainseg_ray.serve.upload import UploadError, decode_upload, media_type

INCLUDES = ("mask", "overlay")


class BackendUnavailable(Exception):
    """No Segmenter replica could answer (starting, restarting, or overloaded): 503."""


class Backend(Protocol):
    async def segment(self, image: np.ndarray, overlay: bool) -> dict:
        """{"findings": Findings.as_dict(), "mask": uint8 {0,1} [H,W], "overlay": uint8 [H,W,3] or
        None, "model_version", "batch_size", "inference_ms", and optionally "timings_ms" (the
        replica's stages: queue, batch_wait, forward, postprocess) and "replied_at" (time.time())}"""

    async def health(self) -> dict: ...

    async def model_info(self) -> dict: ...


_SEGMENT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/tiff": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_SEGMENT_RESPONSES = {
    200: {"description": "findings as JSON, or the overlay PNG with `Accept: image/png`",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
    400: {"description": "undecodable data, wrong channels or bit depth, unknown include"},
    401: {"description": "missing or wrong bearer token (when the server has one)"},
    413: {"description": "body over the size limit"},
    415: {"description": "not a TIFF, PNG or JPEG"},
    503: {"description": "no model replica ready"},
}


def create_app(cfg: ServeConfig, backend: Backend, *, token: str | None = None,
               observe=None) -> FastAPI:
    """The ASGI app of the ingress. `observe(path, status, ms)` records each answer (metrics)."""
    app = FastAPI(title="brainseg-ray segmentation", version=__version__, docs_url=None, redoc_url=None,
                  description="Segments FLAIR abnormalities in one brain MRI slice (LGG kaggle_3m: "
                              "256x256, channels pre-contrast, FLAIR, post-contrast). Research software, "
                              "not a medical device.")
    page = resources.files("brainseg_ray.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.reason, exc.headers)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/v1/health", summary="Ready when a model replica has loaded its model")
    async def health():
        try:
            info = await backend.health()
        except BackendUnavailable as exc:
            return JSONResponse({"status": "loading", "model_loaded": False, "detail": str(exc)}, 503,
                                headers={"Retry-After": "2"})
        return {"status": "ok", "model_loaded": True, "model_version": info["model_version"]}

    @app.get("/v1/model", summary="The served model artifact's metadata and the serving settings")
    async def model():
        try:
            return await backend.model_info()
        except BackendUnavailable as exc:
            raise ApiError(503, "unavailable", str(exc), {"Retry-After": "2"}) from exc

    @app.post("/v1/segment", summary="Segment one slice", openapi_extra={"requestBody": _SEGMENT_BODY},
              responses=_SEGMENT_RESPONSES)
    async def segment(request: Request,
                      include: str | None = Query(None, description="comma-separated extras: mask, overlay "
                                                                    "(base64 PNGs in the JSON)")):
        started = time.perf_counter()
        extras = _parse_include(include)
        as_png = _prefers_png(request.headers.get("accept", ""))
        data, content_type = await _read_slice(request)
        parsed = time.perf_counter()
        try:
            upload = await run_in_threadpool(decode_upload, data, content_type, cfg.max_image_pixels)
        except UploadError as exc:
            raise ApiError(exc.status, exc.code, exc.reason) from exc
        decoded = time.perf_counter()
        try:
            result = await backend.segment(upload.image, as_png or "overlay" in extras)
        except BackendUnavailable as exc:
            raise ApiError(503, "unavailable", str(exc), {"Retry-After": "1"}) from exc
        answered, answered_at = time.perf_counter(), time.time()
        findings = result["findings"]
        if as_png:
            png = await run_in_threadpool(encode_png, result["overlay"])
            return Response(png, media_type="image/png", headers=_finding_headers(findings, result, upload))
        body: dict[str, Any] = {
            **{k: findings[k] for k in ("tumor_present", "tumor_area_px", "tumor_area_mm2", "bbox", "confidence",
                                        "max_probability")},
            "model_version": result["model_version"],
            "input": upload.describe(),
            "warnings": _warnings(upload),
            "batch_size": result["batch_size"],
        }
        if extras:
            body.update(await run_in_threadpool(_pngs, result, extras))
        finished = time.perf_counter()
        body["timings_ms"] = _timings(result, parse=parsed - started, decode=decoded - parsed,
                                      model=answered - decoded, encode=finished - answered, total=finished - started,
                                      returned=answered_at - result.get("replied_at", answered_at))
        return body

    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * 1e6))
    if token:
        app.add_middleware(BearerAuth, token=token)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["X-Tumor-Present", "X-Tumor-Area-Px", "X-Model-Version"])
    if observe is not None:
        app.add_middleware(RequestMetrics, observe=observe)
    return app


async def _read_slice(request: Request) -> tuple[bytes, str]:
    """(bytes, declared content type) of the slice: the multipart field "file" (or the only file
    field), else the raw body."""
    content_type = request.headers.get("content-type", "")
    if media_type(content_type) != "multipart/form-data":
        return await request.body(), content_type
    form = await request.form(max_files=4, max_fields=16)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        chosen = form.get("file") if isinstance(form.get("file"), UploadFile) else (files[0] if len(files) == 1 else None)
        if chosen is None:
            raise ApiError(400, "no_file", "multipart upload without one file field: send the slice as field 'file'")
        return await chosen.read(), chosen.content_type or ""
    finally:
        await form.close()


def _timings(result: dict, *, parse: float, decode: float, model: float, encode: float, total: float,
             returned: float) -> dict:
    """Milliseconds per stage of one request: here (parse, decode, encode), on its way to the
    replica (queue: the handle's routing and transfer), in the replica (batch_wait for company,
    forward, postprocess with findings and overlay; inference is the two), back (return)."""
    replica = result.get("timings_ms") or {}
    inference = result["inference_ms"]
    stages = {"parse": parse * 1000, "decode": decode * 1000, "queue": replica.get("queue", 0.0),
              "batch_wait": replica.get("batch_wait", 0.0), "forward": replica.get("forward", inference),
              "postprocess": replica.get("postprocess", 0.0), "inference": inference,
              "return": max(0.0, returned * 1000) if replica else max(0.0, model * 1000 - inference),
              "encode": encode * 1000, "total": total * 1000}
    return {k: round(v, 2) for k, v in stages.items()}


def _parse_include(include: str | None) -> set[str]:
    extras = {part.strip().lower() for part in (include or "").split(",") if part.strip()}
    unknown = sorted(extras - set(INCLUDES))
    if unknown:
        raise ApiError(400, "bad_include", f"unknown include {', '.join(unknown)}; expected any of {', '.join(INCLUDES)}")
    return extras


def _prefers_png(accept: str) -> bool:
    """Accept names image/png with a higher preference than JSON (JSON wins ties and wildcards)."""
    quality = {}
    for item in accept.split(","):
        kind, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[kind.lower()] = max(q, quality.get(kind.lower(), 0.0))
    png = quality.get("image/png", 0.0)
    json_q = max(quality.get("application/json", 0.0), quality.get("application/*", 0.0), quality.get("*/*", 0.0))
    return png > 0 and png > json_q


def _warnings(upload) -> list[str]:
    if not upload.resized:
        return []
    h, w = upload.image.shape[:2]
    return [f"resized from {upload.width}x{upload.height} to {w}x{h}: the mask, areas and bbox refer to "
            f"the {w}x{h} slice"]


def _pngs(result: dict, extras: set[str]) -> dict:
    out = {}
    if "mask" in extras:
        out["mask_png"] = base64.b64encode(mask_png(result["mask"])).decode("ascii")
    if "overlay" in extras:
        out["overlay_png"] = base64.b64encode(encode_png(result["overlay"])).decode("ascii")
    return out


def _finding_headers(findings: dict, result: dict, upload) -> dict:
    bbox = findings["bbox"]
    return {"X-Tumor-Present": str(findings["tumor_present"]).lower(),
            "X-Tumor-Area-Px": str(findings["tumor_area_px"]),
            "X-Tumor-Area-Mm2": f"{findings['tumor_area_mm2']:g}",
            "X-Bbox": ",".join(map(str, bbox)) if bbox else "",
            "X-Confidence": f"{findings['confidence']:.6f}",
            "X-Model-Version": result["model_version"],
            "X-Resized": str(upload.resized).lower()}
