"""ServeConfig from wherever it is given: the application builder's `args` (serve_config.yaml or
`serve run brainseg_ray.serve.app:app key=value`), a config file, and `brainseg serve` flags.

Defaults live in config.ServeConfig and the merging of settings in config.py; this module only
knows what is particular to Serve (a Serve config file's application args, the builder's `model=`
and text-only values) and checks the result.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from brainseg_ray.config import ConfigError, ServeConfig, config_from_mapping, from_dict, read_mapping, set_setting

IMPORT_PATH = "brainseg_ray.serve.app:app"


def from_args(args: dict | None) -> ServeConfig:
    """The builder's args: a ServeConfig mapping. Also accepted, for `serve run ... key=value`:
    `model=` for segmenter.model, dotted keys (`autoscaling.max_replicas=3`), and numbers or
    booleans given as text (the command line passes only strings)."""
    return check(from_dict(ServeConfig, _merge_args({}, args or {})))


def load(path: str | None = None, overrides: list[str] | None = None, *, model: str | None = None,
         host: str | None = None, port: int | None = None) -> ServeConfig:
    """`brainseg serve`: defaults < the file (a ServeConfig mapping, or a Serve config file like
    serve_config.yaml: its brainseg application's args and its http_options) < flags < key=value."""
    data = _read_file(path) if path else {}
    segmenter = {"model": model} if model else None
    return check(config_from_mapping(ServeConfig, data, overrides, segmenter=segmenter, host=host, port=port))


def check(cfg: ServeConfig) -> ServeConfig:
    if not cfg.segmenter.model:
        raise ConfigError("serve needs a model artifact: --model PATH_OR_S3_URI (or segmenter.model=...)")
    if cfg.segmenter.largest_component_3d:
        raise ConfigError("segmenter.largest_component_3d needs a patient's whole stack of slices; "
                          "the endpoint segments one slice per request (use `brainseg segment`)")
    if cfg.max_body_mb <= 0 or cfg.max_image_pixels <= 0:
        raise ConfigError(f"max_body_mb and max_image_pixels must be positive, got {cfg.max_body_mb!r} "
                          f"and {cfg.max_image_pixels!r}")
    if cfg.batch_wait_timeout_s < 0 or cfg.cpus_per_replica < 0:
        raise ConfigError("batch_wait_timeout_s and cpus_per_replica cannot be negative")
    if cfg.gpus_per_replica <= 0:
        raise ConfigError(f"gpus_per_replica must be positive (use_gpu=false for none), got {cfg.gpus_per_replica!r}")
    if cfg.max_batch_size < 1 or cfg.max_ongoing_requests < 1 or cfg.ingress_max_ongoing_requests < 1:
        raise ConfigError("max_batch_size, max_ongoing_requests and ingress_max_ongoing_requests must be >= 1")
    scaling = cfg.autoscaling
    if not 0 <= scaling.min_replicas <= scaling.max_replicas or scaling.max_replicas < 1:
        raise ConfigError(f"autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                          f"got {scaling.min_replicas} and {scaling.max_replicas}")
    return cfg


def resolve_token(cfg: ServeConfig) -> str | None:
    """The bearer token: the environment variable named by auth_token_env, else auth_token; an
    empty value counts as unset (no auth)."""
    token = (os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None) or cfg.auth_token
    return token or None


def _read_file(path: str) -> dict:
    loaded = read_mapping(path)
    if "applications" not in loaded:
        return loaded
    apps = [a for a in loaded.get("applications") or [] if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application with import_path {IMPORT_PATH}, found {len(apps)}")
    http = loaded.get("http_options") or {}
    data = {k: http[k] for k in ("host", "port") if k in http}
    data.update({k: apps[0][k] for k in ("name", "route_prefix") if k in apps[0]})
    if "name" in data:
        data["app_name"] = data.pop("name")
    return _merge_args(data, apps[0].get("args") or {})


def _merge_args(data: dict, args: dict) -> dict:
    """The builder's args onto `data`: `model` is segmenter.model, and text (all the command line
    gives) is read as YAML unless the setting holds text."""
    for key, value in args.items():
        key = "segmenter.model" if key == "model" else key
        if isinstance(value, str) and not _is_text_field(ServeConfig, key):
            value = yaml.safe_load(value) if value.strip() else None
        set_setting(data, key, value)
    return data


def _is_text_field(cls: type, dotted: str) -> bool:
    """Whether the setting at `dotted` holds text (str or str | None)."""
    hint: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return False
        hints = typing.get_type_hints(hint)
        if part not in hints:
            return False  # from_dict names the unknown setting
        hint = hints[part]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = options[0] if len(options) == 1 else hint
    return hint is str
