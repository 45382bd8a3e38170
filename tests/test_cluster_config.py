"""cluster.yaml against Ray's own cluster-config validation, and the KubeRay manifests in k8s/.

cluster.yaml goes through what `ray up` does before it talks to AWS: `prepare_config` (merge with the
AWS provider's defaults.yaml, fold setup_commands into the head and worker lists, fill each node
type's min/max workers) and `validate_config` (Ray's ray-schema.json, plus its checks of head type
and worker counts). Nothing here contacts AWS or Kubernetes.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
K8S = REPO / "k8s"


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_validation(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["cluster_synced_files"] == []  # a default filled in from Ray's AWS defaults.yaml


def _more_min_workers_than_max(config: dict) -> None:
    config["max_workers"] = 1
    config["available_node_types"]["cpu_worker"]["min_workers"] = 2


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(unknown_field=1), "Additional properties"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "one"}), "is not of type"),
    (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
    (_more_min_workers_than_max, "max_workers"),
], ids=["unknown-field", "resource-type", "head-type", "min-over-max"])
def test_validation_rejects_a_broken_config(mutate, error):
    """The validator really runs: the same config with one mistake is refused."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _cluster()
    mutate(config)
    with pytest.raises(Exception, match=error):
        validate_config(prepare_config(config))


def test_cpu_head_and_autoscaling_gpu_workers(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert not head["resources"].get("GPU")
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head is a CPU instance"
    gpu_groups = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, "a worker group with GPUs"
    for name, group in gpu_groups.items():
        assert name != prepared["head_node_type"]
        assert group["min_workers"] == 0 and group["max_workers"] >= 1, name
        assert re.match(r"g[56]\.", group["node_config"]["InstanceType"]), name
    assert prepared["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())


def test_s3_through_instance_profiles_and_no_keys(prepared):
    text = CLUSTER_YAML.read_text()
    for name, node_type in prepared["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name} has no instance profile"
    for secret in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)aws_access_key_id", r"(?i)aws_session_token"):
        assert not re.search(secret, text), secret
    # The package turns the metadata service off by default; the nodes need it for the profile.
    setup = " ".join(prepared["head_setup_commands"])
    assert "AWS_EC2_METADATA_DISABLED=false" in setup


def test_setup_installs_the_project_with_a_cuda_torch(prepared):
    assert prepared["file_mounts"]["~/brainseg-ray"] == "."  # the repository, as `ray up` syncs it
    assert {".git", ".venv"} <= set(prepared["rsync_exclude"])
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        text = "\n".join(commands)
        torch_step = next(c for c in commands if "torch" in c and "pip install" in c)
        assert "download.pytorch.org/whl/cu" in torch_step
        project_step = next(c for c in commands if re.search(r"pip install .*-e ~/brainseg-ray(\s|$)", c))
        assert commands.index(torch_step) < commands.index(project_step), "CUDA torch first, then the project"
        assert "RAY_USAGE_STATS_ENABLED=0" in text and "RAY_AUTH_MODE=token" in text


def test_ray_starts_with_token_auth_and_without_usage_stats(prepared):
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert len(starts) == 1, key
        assert "--disable-usage-stats" in starts[0]
        assert "source ~/brainseg-ray.env" in starts[0]  # RAY_AUTH_MODE=token and the rest
    assert "--head" in prepared["head_start_ray_commands"][-1]


# --- KubeRay ---------------------------------------------------------------------------------------

# Field names of KubeRay's ray.io/v1 API (KubeRay CRD API reference, v1.5-v1.7): a typo here would be
# dropped silently by the API server's pruning, so the manifests are held to these.
RAY_CLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                    "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                    "gcsFaultToleranceOptions", "authOptions", "upgradeStrategy"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "suspend"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode", "version"}
RAY_JOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
                "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "submissionMode",
                "submitterPodTemplate", "submitterConfig", "entrypointNumCpus", "entrypointNumGpus",
                "entrypointResources", "jobId", "metadata", "suspend", "managedBy", "deletionStrategy"}
RAY_SERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
                    "excludeHeadPodFromServeSvc", "managedBy"}


def _manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for name, doc in _manifests():
        if doc["kind"] == "RayCluster":
            specs.append((name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((name, doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayService":
            specs.append((name, doc["spec"]["rayClusterConfig"]))
    return specs


def _dockerfile() -> tuple[str, str, list[str]]:
    """(base image, WORKDIR, COPY sources) of k8s/Dockerfile."""
    base, workdir, sources = "", "", []
    for line in (K8S / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            base = words[1]
        elif words[0] == "WORKDIR":
            workdir = words[1]
        elif words[0] == "COPY":
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return base, workdir, sources


def _repo_path(token: str, workdir: str) -> Path | None:
    """The repository file an image path or a relative path in a command stands for, if any."""
    if token.startswith(workdir + "/"):
        return REPO / token[len(workdir) + 1:]
    if re.fullmatch(r"(jobs|brainseg_ray)/\S+", token):
        return REPO / token
    return None


def test_manifests_parse_with_the_expected_kinds():
    kinds = {}
    for name, doc in _manifests():
        kinds.setdefault(doc["kind"], []).append(name)
        expected = "v1" if doc["kind"] == "ServiceAccount" else "ray.io/v1"
        assert doc["apiVersion"] == expected, (name, doc["kind"])
        assert doc["metadata"]["name"]
    assert kinds == {"RayCluster": ["raycluster.yaml"], "RayJob": ["rayjob-segment.yaml"],
                     "RayService": ["rayservice.yaml"], "ServiceAccount": ["serviceaccount.yaml"]}


def test_manifest_fields_are_kuberays():
    for name, doc in _manifests():
        if doc["kind"] == "RayJob":
            assert set(doc["spec"]) <= RAY_JOB_SPEC, (name, set(doc["spec"]) - RAY_JOB_SPEC)
        if doc["kind"] == "RayService":
            assert set(doc["spec"]) <= RAY_SERVICE_SPEC, (name, set(doc["spec"]) - RAY_SERVICE_SPEC)
    for name, spec in _cluster_specs():
        assert set(spec) <= RAY_CLUSTER_SPEC, (name, set(spec) - RAY_CLUSTER_SPEC)
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, name
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS, name
        for group in spec.get("workerGroupSpecs", []):
            assert set(group) <= WORKER_GROUP, (name, set(group) - WORKER_GROUP)
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (name, group["groupName"])
        for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]:
            assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"


def test_every_cluster_runs_this_ray_with_token_auth_and_one_image():
    import ray

    base, _, _ = _dockerfile()
    assert base.startswith(f"rayproject/ray:{ray.__version__}-"), base
    images = set()
    for name, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"]["mode"] == "token", name
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        assert any(nvidia_gpus(p) for p in pods), f"{name} has a GPU worker group"
        for pod in pods:
            assert pod["spec"]["serviceAccountName"] == "brainseg-ray", name  # S3 through the pod's IAM role
            for container in pod["spec"]["containers"]:
                images.add(container["image"])
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("RAY_USAGE_STATS_ENABLED") == "0", name
                assert not any("SECRET" in k or "ACCESS_KEY" in k for k in env), name
    assert len(images) == 1, images


def nvidia_gpus(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["spec"]["containers"])


def test_commands_refer_to_files_in_the_repo():
    _, workdir, sources = _dockerfile()
    assert workdir == "/home/ray/brainseg-ray"
    for source in sources:
        assert (REPO / source).exists(), f"k8s/Dockerfile copies {source}, which is not in the repo"
    assert {"brainseg_ray", "jobs", "pyproject.toml"} <= set(sources)
    commands = []
    for name, doc in _manifests():
        if doc["kind"] == "RayJob":
            commands.append((name, doc["spec"]["entrypoint"]))
        specs = [s for n, s in _cluster_specs() if n == name]
        for spec in specs:
            for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
                for container in pod["spec"]["containers"]:
                    words = [*container.get("command", []), *container.get("args", [])]
                    if words:
                        commands.append((name, " ".join(words)))
    assert commands
    for name, command in commands:
        files = [p for p in (_repo_path(t, workdir) for t in shlex.split(command)) if p is not None]
        assert files, f"{name}: {command!r} names no file of the repo"
        for path in files:
            assert path.is_file(), f"{name}: {command!r} refers to {path.relative_to(REPO)}, which does not exist"
    entry = shlex.split(dict(commands)["rayjob-segment.yaml"])
    assert entry[:2] == ["python", f"{workdir}/jobs/segment_archive.py"]


def test_rayjob_installs_nothing_at_run_time():
    for name, doc in _manifests():
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
            assert not set(runtime_env) & {"pip", "conda", "uv", "container", "image_uri", "py_modules"}, name


def test_rayservice_serves_the_serve_config_application():
    from brainseg_ray.config import ServeConfig, from_dict

    service = next(doc for _, doc in _manifests() if doc["kind"] == "RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert [a["import_path"] for a in serve["applications"]] == [a["import_path"] for a in local["applications"]]
    assert serve["http_options"]["host"] == "0.0.0.0"  # reached through the Kubernetes Service
    for application in serve["applications"]:
        from_dict(ServeConfig, application["args"])  # every setting is one ServeConfig knows
        module, attribute = application["import_path"].split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, module
        tree = ast.parse(Path(spec.origin).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert attribute in defined, f"{module} defines no {attribute}"
