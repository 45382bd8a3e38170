"""The HTTP segmentation endpoint on Ray Serve.

    app.py         the deployments (FastAPI ingress, Segmenter with @serve.batch) and the
                   application builder named in serve_config.yaml (`brainseg_ray.serve.app:app`)
    settings.py    ServeConfig from the builder's args, a config file, flags; the bearer token
    api.py         the FastAPI routes: parsing requests, shaping answers
    upload.py      request bytes -> a validated slice (the ingest's own decoder)
    middleware.py  body limit, bearer auth, request metrics (plain ASGI)
    metrics.py     Ray Serve custom metrics (Prometheus through Ray's metrics export)
    loadgen.py     a bounded HTTP load generator for the tests and bench/serve.py
    static/        the web page served at GET /
"""
