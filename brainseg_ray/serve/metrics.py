"""The endpoint's own metrics, as Ray Serve custom metrics.

Ray exports them in Prometheus format from each node's metrics agent (`ray_` prefix, counters with
`_total`), tagged with the deployment, replica and application by Serve:

    ray_brainseg_requests_total{endpoint, status}        HTTP answers by route and status code
    ray_brainseg_request_latency_ms_bucket{endpoint}      time from request to answer, in the ingress
    ray_brainseg_batch_size_bucket                       slices per forward pass (@serve.batch)
    ray_brainseg_inference_latency_ms_bucket             forward pass and post-processing per batch
    ray_brainseg_slices_total{tumor}                     slices segmented, tumour found or not
    ray_brainseg_tumor_positive_rate                     that replica's share of tumour slices so far

Both classes must be built inside a Serve replica (its __init__), where Serve adds its tags.
"""

from __future__ import annotations

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
ENDPOINTS = ("/", "/v1/segment", "/v1/health", "/v1/model", "/openapi.json")


def endpoint_tag(path: str) -> str:
    """The route as a tag; any other path is "other", so unknown URLs cannot grow the series."""
    return path if path in ENDPOINTS else "other"


class IngressMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("brainseg_requests", description="HTTP answers by route and status code",
                                        tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram("brainseg_request_latency_ms", description="request to answer, ms",
                                         boundaries=LATENCY_MS, tag_keys=("endpoint",))

    def observe(self, path: str, status: int, latency_ms: float) -> None:
        endpoint = endpoint_tag(path)
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(latency_ms, tags={"endpoint": endpoint})


class SegmenterMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.batch_size = metrics.Histogram("brainseg_batch_size", description="slices per forward pass",
                                            boundaries=BATCH_SIZES)
        self.inference = metrics.Histogram("brainseg_inference_latency_ms",
                                           description="forward pass and post-processing of one batch, ms",
                                           boundaries=LATENCY_MS)
        self.slices = metrics.Counter("brainseg_slices", description="slices segmented, by tumour found",
                                      tag_keys=("tumor",))
        self.positive_rate = metrics.Gauge("brainseg_tumor_positive_rate",
                                           description="share of this replica's slices with tumour found")
        self._seen = self._positive = 0

    def observe_batch(self, size: int, latency_ms: float, positives: int) -> None:
        self.batch_size.observe(size)
        self.inference.observe(latency_ms)
        if positives:
            self.slices.inc(positives, tags={"tumor": "true"})
        if size - positives:
            self.slices.inc(size - positives, tags={"tumor": "false"})
        self._seen += size
        self._positive += positives
        self.positive_rate.set(self._positive / self._seen)
