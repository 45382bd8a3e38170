"""A real two-node Ray cluster on this machine, driven only through Ray's own CLI.

`ray start --head` and `ray start --address` start two nodes (one CPU each) with token
authentication on; `ray job submit` runs the ingest, train and segment jobs of jobs/ on them;
`ray job logs`, `ray job status` and `ray job stop` do the rest. The outputs are checked on disk (the
nodes share this machine's filesystem).

Addresses: Ray replaces 127.0.0.1 and localhost by the machine's routable address when it starts a
node (services.resolve_ip_for_localhost), so the nodes take other loopback addresses, 127.0.0.2 (head)
and 127.0.0.3 (worker), which it leaves alone: every connection stays on the loopback interface, and
each node has an address of its own as on real machines.

Teardown: `ray stop` stops every Ray process of the machine (the test session's own instance and
other people's too), so it is not used. The cluster's processes are those whose command line or
environment names its private temp dir, and their descendants (workers rename themselves and their
environment reads back empty, but they are children of their raylet); they are frozen with SIGSTOP
(so none can spawn another), then killed, and the test checks that none is left.

The `cluster` fixture is module-scoped so that other tests of this module (Serve's
`serve deploy serve_config.yaml` and an HTTP call) can use the same cluster: `cluster.run("serve",
"deploy", CONFIG, "--address", cluster.dashboard_url)` runs a CLI of the venv with the cluster's
environment (token auth included). Both nodes are on this one machine, so Serve's proxies cannot
all bind the same port: a test config wants `proxy_location: HeadOnly` and a free port.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# What a job's --working-dir upload leaves out (.gitignore'd paths are left out too).
UPLOAD_EXCLUDES = [".git", ".venv", "/data", "demo-out", "out", "test-artifacts", "**/__pycache__", ".pytest_cache",
                   "*.egg-info"]
# The train job's tiny model (tests/test_train.py's TINY) and 2 data-parallel workers, one per node.
TINY_TRAIN = ["model=unet", "base_filters=4", "image_size=64", "batch_size=4", "augmentation=light",
              "num_workers=2", "cpus_per_worker=1"]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RayCliCluster:
    """A running two-node cluster; what a client needs to reach it."""

    dashboard_url: str  # http://HEAD_IP:PORT: `ray job ... --address`, `serve deploy --address`
    gcs_address: str  # HEAD_IP:PORT: `ray start --address`, `ray status --address`
    env: dict[str, str]  # the environment of its processes and clients (token auth, the venv first in PATH)
    temp_dir: Path  # the cluster's own root: node temp dirs, the token file
    token: str
    head_ip: str = HEAD_IP  # what the head's services (Serve's proxy among them) listen on

    def run(self, program: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """A CLI of the venv (`ray`, `serve`, `python`, ...) with the cluster's environment."""
        cmd = [str(VENV_BIN / program), *args]
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                                 f"\n--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def ray(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("ray", *args, **kwargs)

    # Jobs ------------------------------------------------------------------------------------------
    def submit(self, name: str, *entrypoint: str, wait: bool = True, timeout: float = 240) -> tuple[str, str]:
        """`ray job submit` of ENTRYPOINT with this repository as the working dir; returns the
        submission id and the CLI's output (with wait: the job's logs, tailed to its end)."""
        job_id = f"{name}-{uuid.uuid4().hex[:8]}"
        runtime_env = {"excludes": UPLOAD_EXCLUDES}  # nothing to install: the nodes run the venv
        args = ["job", "submit", "--address", self.dashboard_url, "--submission-id", job_id,
                "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env)]
        if not wait:
            args.append("--no-wait")
        started = time.monotonic()
        try:
            proc = self.ray(*args, "--", *entrypoint, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            self.ray("job", "stop", "--no-wait", "--address", self.dashboard_url, job_id, check=False)
            raise AssertionError(f"job {job_id} did not finish in {timeout} s; its logs:\n{self.logs(job_id)[-6000:]}")
        if proc.returncode != 0:
            raise AssertionError(f"job {job_id} failed (exit {proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}")
        print(f"{job_id}: `ray job submit{'' if wait else ' --no-wait'}` returned after {time.monotonic() - started:.1f} s")
        return job_id, proc.stdout + proc.stderr

    def status(self, job_id: str) -> str:
        """The job's status as `ray job status` reports it: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED."""
        out = self.ray("job", "status", "--address", self.dashboard_url, job_id, timeout=60)
        text = out.stdout + out.stderr
        for phrase, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"), ("failed", "FAILED")):
            if f"Job '{job_id}' {phrase}" in text:
                return status
        found = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
        assert found, f"no status in `ray job status` output:\n{text}"
        return found.group(1)

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.dashboard_url, job_id, timeout=60).stdout

    def wait_for_logs(self, job_id: str, text: str, timeout: float) -> str:
        """The job's logs up to the first line holding `text`, read as `ray job logs --follow`
        streams them: one CLI start, and the line is seen when it is written (polling `ray job
        logs` and `ray job status` cost two CLI starts a round)."""
        cmd = [str(VENV_BIN / "ray"), "job", "logs", "--follow", "--address", self.dashboard_url, job_id]
        follow = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            for line in follow.stdout:
                lines.append(line)
                if text in line:
                    found.set()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            reader.join(timeout)  # ends at the line, or when the stream ends with the job
        finally:
            follow.kill()
            follow.wait()
        if not found.is_set():
            status = self.status(job_id)
            raise AssertionError(f"job {job_id} is {status} and its logs never showed {text!r}:\n"
                                 f"{''.join(lines)[-6000:]}")
        return "".join(lines)

    def nodes(self) -> list[dict]:
        out = self.ray("list", "nodes", "--address", self.dashboard_url, "--format", "json", timeout=60)
        return json.loads(out.stdout)

    def free_cpus(self) -> float:
        """CPUs not in use over the cluster, as `ray status` reports them ("1.0/2.0 CPU": used/total)."""
        out = self.ray("status", "--address", self.gcs_address, timeout=60).stdout
        used, total = re.search(r"([\d.]+)/([\d.]+) CPU", out).groups()
        return float(total) - float(used)


# Processes and teardown ----------------------------------------------------------------------------
def _proc_table(marker: bytes) -> dict[int, tuple[int, bool, bool]]:
    """pid -> (parent pid, names the marker in its command line or environment, is a zombie)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                hit = marker in f.read()
            if not hit:
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        hit = marker in f.read()
                except OSError:
                    pass
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), hit, fields[0] == b"Z")
    return table


def cluster_processes(temp_dir: Path) -> set[int]:
    """The live processes of the cluster rooted at temp_dir: those naming it, and their descendants."""
    table = _proc_table(f"{temp_dir}/".encode())  # with the slash: /tmp/bsr-x is no prefix of /tmp/bsr-xy
    mine = {os.getpid(), os.getppid()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [pid for pid, (_, hit, _) in table.items() if hit and pid not in mine]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    return {pid for pid in found if not table[pid][2]}


def kill_cluster(temp_dir: Path, timeout: float = 20) -> set[int]:
    """Freeze, then kill, every process of the cluster at temp_dir; the pids it killed."""
    frozen: set[int] = set()
    for _ in range(10):  # until no new process appears (one may be forking as we look)
        new = cluster_processes(temp_dir) - frozen
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= new
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while cluster_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return frozen


def _start_node(env: dict, args: list[str]) -> None:
    # A session of its own: the daemons outlive this call and take no signal meant for pytest.
    proc = subprocess.run([str(VENV_BIN / "ray"), "start", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")


def _node_ports(ip: str) -> list[str]:
    """Every port a node opens, chosen free (two nodes share this machine; Ray's fixed defaults,
    e.g. the dashboard agent's 52365, would collide with each other and with other instances)."""
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    return [f"--{name}={_free_port(ip)}" for name in names]


@pytest.fixture(scope="module")
def cluster():
    # Short and private: Ray's Unix socket paths under it must stay under 108 bytes, which a
    # pytest tmp_path does not leave room for.
    temp_dir = Path(tempfile.mkdtemp(prefix="bsr-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"}}
    env.update({
        # Ray 2.60 `ray start` turns token auth on only when asked to (or when ~/.ray/auth_token
        # exists); a token of this cluster's own, in a file of its own, leaves ~/.ray alone.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in an entrypoint: the venv's
        "PYTHONUNBUFFERED": "1",
        "BRAINSEG_TEST_CLUSTER": f"{temp_dir}/",  # marks this cluster's processes for the teardown
    })
    common = ["--num-cpus=1", "--num-gpus=0", f"--object-store-memory={300 * 1024 * 1024}", "--disable-usage-stats"]
    started, up = time.monotonic(), False
    try:
        # A loaded machine can make `ray start` give up on its own GCS ("Deadline Exceeded"): one
        # more try, on fresh ports, after the first try's processes are gone.
        for attempt in (1, 2):
            gcs_port, dashboard_port = _free_port(HEAD_IP), _free_port(HEAD_IP)
            # For Ray's own processes that look the cluster up (Ray Train's placement-group
            # cleaner): other Ray instances on this machine would make the lookup ambiguous.
            env["RAY_API_SERVER_ADDRESS"] = f"http://{HEAD_IP}:{dashboard_port}"
            try:
                _start_node(env, ["--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
                                  f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dashboard_port}",
                                  f"--ray-client-server-port={_free_port(HEAD_IP)}", *_node_ports(HEAD_IP),
                                  f"--temp-dir={temp_dir / f'head-{attempt}'}", *common])
                _start_node(env, [f"--address={HEAD_IP}:{gcs_port}", f"--node-ip-address={WORKER_IP}",
                                  *_node_ports(WORKER_IP), f"--temp-dir={temp_dir / f'worker-{attempt}'}", *common])
                break
            except RuntimeError as exc:
                if attempt == 2:
                    raise
                print(f"cluster start failed, trying again: {str(exc)[-500:]}")
                kill_cluster(temp_dir)
        handle = RayCliCluster(dashboard_url=f"http://{HEAD_IP}:{dashboard_port}", gcs_address=f"{HEAD_IP}:{gcs_port}",
                               env=env, temp_dir=temp_dir, token=token)
        deadline = time.monotonic() + 60
        while sum(n["state"] == "ALIVE" for n in handle.nodes()) < 2:
            assert time.monotonic() < deadline, f"2 nodes not alive: {handle.nodes()}"
            time.sleep(1)
        print(f"cluster up in {time.monotonic() - started:.1f} s at {handle.dashboard_url}")
        up = True
        yield handle
    finally:
        killed = kill_cluster(temp_dir)
        left = cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster left running: {sorted(left)}"
        assert killed or not up, "no process of the test cluster was found to stop"


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory) -> Path:
    """6 small synthetic patients in the kaggle_3m layout (as `brainseg synth` writes them)."""
    from brainseg_ray.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("cluster-synth")
    return Path(write_synthetic_dataset(str(out), patients=6, seed=3, slices_per_patient=(8, 10)).root)


@pytest.fixture(scope="module")
def ingested(cluster, synthetic_source, tmp_path_factory):
    dataset = tmp_path_factory.mktemp("cluster-ds") / "dataset"
    # slices_per_task: several Ray Data tasks, so both nodes read and decode
    job_id, output = cluster.submit("ingest", "python", "jobs/ingest.py", str(synthetic_source), "--out", str(dataset),
                                    "slices_per_task=16")
    return job_id, output, dataset


@pytest.fixture(scope="module")
def trained(cluster, ingested, tmp_path_factory):
    _, _, dataset = ingested
    run = tmp_path_factory.mktemp("cluster-run") / "run"
    job_id, output = cluster.submit("train", "python", "jobs/train.py", "--data", str(dataset), "--out", str(run),
                                    "--epochs", "1", *TINY_TRAIN)
    return job_id, output, run


def test_two_nodes_with_token_auth(cluster):
    nodes = cluster.nodes()
    assert sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE") == [HEAD_IP, WORKER_IP]
    assert sum(n["is_head_node"] for n in nodes) == 1
    # The dashboard (job submission, state API) refuses a request without the token, and a wrong one.
    jobs_api = f"{cluster.dashboard_url}/api/jobs/"
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(jobs_api, headers=headers), timeout=30)
        assert refused.value.code == code
    request = urllib.request.Request(jobs_api, headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    # So does Ray's own CLI without the token.
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    cmd = [str(VENV_BIN / "ray"), "job", "list", "--address", cluster.dashboard_url]
    denied = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0, denied.stdout


def test_default_cpus_fit_on_one_node(cluster):
    """Two nodes of one CPU: the cluster has 2, but one actor or worker can hold only 1."""
    code = ("import ray; from brainseg_ray.runtime import cpus_per_actor as d; "
            f"ray.init(address={cluster.gcs_address!r}); print(d(1), d(2))")
    out = cluster.run("python", "-c", code, timeout=120)
    assert out.stdout.split()[-2:] == ["1.0", "1.0"], out.stdout + out.stderr


def test_ingest_job(cluster, ingested):
    job_id, output, dataset = ingested
    assert "ingest: " in output and " errors -> " in output  # the job's summary line, tailed by `ray job submit`
    assert cluster.status(job_id) == "SUCCEEDED"
    manifest = json.loads((dataset / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["files_found"] == counts["slices_written"] + counts["errors"]
    assert counts["errors"] == 0 and counts["slices_written"] >= 48
    assert len(list((dataset / "slices").glob("*.parquet"))) >= 3
    logs = cluster.logs(job_id)
    assert f"ingest: {counts['files_found']} slice files found, {counts['slices_written']} slices written" in logs


def test_train_job(cluster, trained):
    from brainseg_ray.models.artifact import load_artifact

    job_id, logs, run = trained
    # `ray job submit` tailed the job's logs to its end and its status (`ray job status` and `ray
    # job logs` themselves are checked on the ingest job).
    assert f"Job '{job_id}' succeeded" in logs
    assert "2 worker(s) x 1 CPU" in logs  # one data-parallel worker on each node
    assert "train: epoch 1/1" in logs and "train: 1 epochs" in logs
    assert [row["epoch"] for row in json.loads((run / "history.json").read_text())] == [1]
    artifact = load_artifact(str(run / "model"))  # loads and checks the weights' SHA-256
    assert artifact.spec.name == "unet" and artifact.spec.base_filters == 4
    assert artifact.metadata["input"]["size"] == 64
    assert (run / "split.json").is_file() and (run / "curves.png").is_file()


def test_segment_job(cluster, trained, synthetic_source, tmp_path):
    _, _, run = trained
    out = tmp_path / "segmented"
    # Two Segmenter actors of one CPU: one on each node.
    job_id, output = cluster.submit("segment", "python", "jobs/segment_archive.py", "--model", str(run / "model"),
                                    "--input", str(synthetic_source), "--output", str(out), "concurrency=2",
                                    "cpus_per_actor=1", "slices_per_task=16")
    assert f"Job '{job_id}' succeeded" in output
    manifest = json.loads((out / "manifest.json").read_text())
    found = len(list(synthetic_source.rglob("*.tif"))) - len(list(synthetic_source.rglob("*_mask.tif")))
    assert manifest["counts"]["found"] == found == manifest["counts"]["ok"]
    assert f"segment: {found} slice files found, {found} segmented, 0 errors" in output
    assert len(list((out / "masks").rglob("*_mask.tif"))) == found
    assert len(list((out / "overlays").rglob("*.png"))) == found
    import pyarrow.parquet as pq

    assert pq.read_table(out / "results.parquet").num_rows == found


def test_stop_a_running_job(cluster, ingested, tmp_path):
    _, _, dataset = ingested
    job_id, _ = cluster.submit("train-long", "python", "jobs/train.py", "--data", str(dataset),
                               "--out", str(tmp_path / "run"), "--epochs", "500", *TINY_TRAIN, wait=False)
    # Its driver has read the data and is starting Ray Train (a worker on each node, holding both
    # CPUs); waiting for a whole epoch on top would double this test's time.
    cluster.wait_for_logs(job_id, "2 worker(s) x 1 CPU", timeout=180)
    assert cluster.status(job_id) == "RUNNING"
    stopped = cluster.ray("job", "stop", "--address", cluster.dashboard_url, job_id, timeout=120)
    assert f"Job '{job_id}' was stopped" in stopped.stdout + stopped.stderr
    assert not re.search(r"train: \d+ epochs", cluster.logs(job_id))  # no summary line: it never finished
    assert not (tmp_path / "run" / "model").exists()
    # Whatever it had started (the train controller, its workers) is gone: both CPUs are free again.
    deadline = time.monotonic() + 60
    while (free := cluster.free_cpus()) < 2:
        assert time.monotonic() < deadline, f"only {free} CPUs free a minute after the stop"
        time.sleep(0.5)


def _serve_status(cluster) -> dict:
    """`serve status` (YAML) as a mapping."""
    import yaml

    out = cluster.run("serve", "status", "--address", cluster.dashboard_url, timeout=60).stdout
    return yaml.safe_load(out) or {}


def _serve_app_statuses(cluster) -> dict[str, str]:
    """Each application's status from the dashboard's Serve API, which `serve status` reads: for
    polling, at no CLI start (~2 CPU-seconds each) a round."""
    request = urllib.request.Request(f"{cluster.dashboard_url}/api/serve/applications/",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        details = json.loads(response.read())
    return {name: app["status"] for name, app in (details.get("applications") or {}).items()}


def _post(url: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_deploy(cluster, trained, synthetic_source, tmp_path):
    """`serve deploy serve_config.yaml` (adapted to two nodes on one machine), a real HTTP call,
    `serve status`, `serve shutdown`. Last in the module: test_stop_a_running_job leaves both
    CPUs free, and the Segmenter replica takes one."""
    import base64
    import io

    import numpy as np
    import yaml
    from PIL import Image

    from brainseg_ray.data.decode import read_pixels, to_image
    from brainseg_ray.models.artifact import load_artifact

    _, _, run = trained
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = _free_port(cluster.head_ip)
    api_token = secrets.token_hex(16)
    config["proxy_location"] = "HeadOnly"  # both nodes' proxies cannot bind one port of one machine
    config["http_options"].update(host=cluster.head_ip, port=port)
    [application] = config["applications"]
    args = application["args"]
    args["segmenter"]["model"] = str(run / "model")
    args["cpus_per_replica"] = 1  # a node has one
    args["autoscaling"].update(min_replicas=1, max_replicas=1)
    args["auth_token_env"] = ""  # the token below, whatever BRAINSEG_API_TOKEN the nodes inherited
    args["auth_token"] = api_token
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    base = f"http://{cluster.head_ip}:{port}"
    name = application["name"]

    started = time.monotonic()
    try:
        cluster.run("serve", "deploy", str(config_path), "--address", cluster.dashboard_url, timeout=120)
        deadline = time.monotonic() + 150
        while (app_status := _serve_app_statuses(cluster).get(name)) != "RUNNING":
            assert app_status not in ("DEPLOY_FAILED", "UNHEALTHY") and time.monotonic() < deadline, \
                f"application {name} not RUNNING:\n{yaml.safe_dump(_serve_status(cluster))}"
            time.sleep(0.5)
        print(f"serve deploy: {name} RUNNING after {time.monotonic() - started:.1f} s")
        status = _serve_status(cluster)  # as a user reads it
        assert status["applications"][name]["status"] == "RUNNING"
        deployments = status["applications"][name]["deployments"]
        assert {d: deployments[d]["status"] for d in deployments} == {"Segmenter": "HEALTHY", "SegmentAPI": "HEALTHY"}
        assert deployments["Segmenter"]["replica_states"] == {"RUNNING": 1}
        # HeadOnly: one proxy, on the head.
        head = [n["node_id"] for n in cluster.nodes() if n["is_head_node"]]
        assert list(status["proxies"]) == head and list(status["proxies"].values()) == ["HEALTHY"]

        # Every route but /v1/health needs the token, the web page too.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/", timeout=30)
        assert refused.value.code == 401
        bearer = {"Authorization": f"Bearer {api_token}"}
        with urllib.request.urlopen(urllib.request.Request(f"{base}/", headers=bearer), timeout=30) as response:
            assert response.status == 200 and "text/html" in response.headers["content-type"]
            assert "<html" in response.read().decode().lower()
        slice_path = next(p for p in sorted(synthetic_source.rglob("*.tif")) if not p.name.endswith("_mask.tif"))
        data = slice_path.read_bytes()
        image, (height, width) = to_image(read_pixels(data))
        url = f"{base}/v1/segment?include=mask,overlay"
        code, body = _post(url, data, {"Content-Type": "image/tiff", **bearer})
        assert code == 200, body[:2000]
        answer = json.loads(body)
        assert answer["model_version"] == load_artifact(str(run / "model")).metadata["version"]
        assert answer["input"]["format"] == "TIFF"
        assert (answer["input"]["height"], answer["input"]["width"]) == (height, width)
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
        assert answer["tumor_area_px"] == int((mask > 0).sum())
        assert answer["tumor_present"] == (answer["tumor_area_px"] > 0)
        if answer["tumor_present"]:  # bbox: (x0, y0, x1, y1), ends exclusive
            rows, cols = np.nonzero(mask)
            assert answer["bbox"] == [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
        else:
            assert answer["bbox"] is None
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"]))))
        assert overlay.shape[:2] == image.shape[:2]
    finally:
        shutdown = cluster.run("serve", "shutdown", "-y", "--address", cluster.dashboard_url, timeout=120, check=False)
    assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
    deadline = time.monotonic() + 60
    while apps := _serve_app_statuses(cluster):
        assert time.monotonic() < deadline, f"applications left after `serve shutdown`: {apps}"
        time.sleep(0.5)
    with pytest.raises(OSError):  # the proxy is gone with its port
        urllib.request.urlopen(f"{base}/", timeout=10)
    print(f"serve deploy, status, HTTP and shutdown: {time.monotonic() - started:.1f} s")
