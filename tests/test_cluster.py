"""A real cluster: ``ray start --head`` and two worker nodes (``ray start --address``), then
``ray job submit --working-dir`` the build, as the README does it; and a worker node lost mid-run.

The cluster is a second one beside the session runtime of the other tests: its own ports and
``--temp-dir``. It is stopped by signalling the ``ray start --block`` process this test started,
never with ``ray stop``, which kills every Ray process on the machine (the session runtime too).

Token authentication, as Ray 2.60 turns it on for a head that finds ~/.ray/auth_token: both
commands get ``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN``; a client without the token
is refused.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Iterator

import psutil
import pytest

from fixtures import alpaca_samples, lines_with_groups, write_jsonl
from test_jobs import stop_survivors
from test_pipeline import S, read
from test_pipeline import build as build_one_node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_SECONDS = 180
JOB_SECONDS = 600


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _env(token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_"))}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _wait_for_dashboard(address: str, token: str, head: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    request = urllib.request.Request(address + "/api/version",
                                     headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(request, timeout=5) as reply:
                if reply.status == 200:
                    return
        time.sleep(1)
    raise TimeoutError(f"no dashboard at {address} after {START_SECONDS}s:\n{_tail(log)}")


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the ``ray start --block`` we started (it kills its node's processes), then
    SIGKILL whatever of its process tree is still there after a while."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    stop_survivors(tree, 30)


def _start(args: list[str], env: dict, log: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(["ray", "start", "--block", "--disable-usage-stats", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _get(address: str, token: str, path: str) -> dict:
    request = urllib.request.Request(address + path,
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)


def _wait_for_nodes(address: str, token: str, nodes: int, log: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            alive = [n for n in _get(address, token, "/api/v0/nodes")["data"]["result"]["result"]
                     if n["state"] == "ALIVE"]
            if len(alive) == nodes:
                return
        time.sleep(1)
    raise TimeoutError(f"{nodes} nodes did not join after {START_SECONDS}s:\n{_tail(log)}")


@dataclass
class Cluster:
    address: str  # the dashboard's, for ray job submit
    token: str
    nodes: dict[str, subprocess.Popen]  # each node's `ray start --block`: head, worker1, ...
    temp_dirs: dict[str, str]  # each node's --temp-dir

    def tokenizers(self) -> dict[str, list[str]]:
        """Node name -> titles of the tokenizer actors (starting or working) among the workers
        of that node's raylet (found by its session directory, under the node's temp dir)."""
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if "raylet" not in cmd.split(" ", 1)[0]:
                continue
            for name, temp_dir in self.temp_dirs.items():
                if f"--session_dir={temp_dir}/session_" in cmd:
                    titles = []
                    with contextlib.suppress(psutil.Error):
                        for child in p.children(recursive=True):
                            with contextlib.suppress(psutil.Error):
                                titles.append(" ".join(child.cmdline()))
                    out[name] = [t for t in titles if "MapWorker" in t]
        return out


@contextlib.contextmanager
def ray_cluster(token: str, workers: int = 2) -> Iterator[Cluster]:
    """A head with a dashboard (the job's driver and its writers run there) and ``workers``
    worker nodes, every one its own raylet with its own ports and temp dir, each with one CPU:
    two tokenizer actors of 0.9 CPU can only run on two different nodes, and after one node is
    lost there is still room for the one that restarts."""
    gcs, dashboard, agent, client = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths are limited
    log = os.path.join(temp_dir, "ray-start.log")
    env = _env(token)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop now, don't drain 30 s
    head = _start(["--head", "--num-cpus", "1", "--port", str(gcs),
                   "--dashboard-port", str(dashboard), "--include-dashboard=true",
                   "--dashboard-agent-listen-port", str(agent),
                   "--ray-client-server-port", str(client), "--temp-dir", temp_dir], env, log)
    nodes: dict[str, subprocess.Popen] = {}
    temp_dirs = {"head": temp_dir}
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address, token, head, log)
        for k in range(workers):
            name = f"worker{k + 1}"
            node_dir = temp_dirs[name] = os.path.join(temp_dir, name)
            os.makedirs(node_dir)
            ports = _free_ports(6)
            nodes[name] = _start(
                ["--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                 "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                 "--dashboard-agent-listen-port", str(ports[2]),
                 "--dashboard-agent-grpc-port", str(ports[3]),
                 "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port",
                 str(ports[5]), "--temp-dir", node_dir], env, os.path.join(node_dir, "log"))
        _wait_for_nodes(address, token, workers + 1, log)
        yield Cluster(address, token, {"head": head, **nodes}, temp_dirs)
    finally:
        for node in nodes.values():
            _stop(node)
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One three-node cluster for every test here (starting one costs ~20 s)."""
    with ray_cluster(uuid.uuid4().hex) as c:
        yield c


def _submit(cluster: Cluster, build: list[str], **popen) -> subprocess.Popen:
    submit = ["ray", "job", "submit", "--address", cluster.address, "--working-dir", ROOT, "--"]
    return subprocess.Popen(submit + build, env=_env(cluster.token), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_ray_job_submit_builds_on_a_started_cluster(cluster, qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_samples(12, seed=4))
    prefix = tmp_path / "out" / "sft"
    build = ["python", "jobs/build.py", "--input", data, "--tokenizer", qwen_dir,
             "--seq-length", "256", "--packing", "bfd", "--output-prefix", str(prefix),
             "--workers", "2", "--no-progress"]
    refused = subprocess.run(["ray", "job", "list", "--address", cluster.address],
                             env=_env(None), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Authentication" in refused.stderr + refused.stdout
    job = _submit(cluster, build)
    logs, _ = job.communicate(timeout=JOB_SECONDS)
    assert job.returncode == 0, logs[-4000:]
    assert "records read" in logs and "verified" in logs
    verify = subprocess.run([sys.executable, "-m", "sftprep", "verify", f"{prefix}_text_document"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith("ok:") and "12 samples" in verify.stdout


def _kill_tree(node: subprocess.Popen) -> None:
    """Lose a node: SIGKILL its `ray start` and every process of it at once."""
    tree = [psutil.Process(node.pid)] + psutil.Process(node.pid).children(recursive=True)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=30)
    node.wait()


def test_losing_a_worker_node_mid_run_changes_no_byte(cluster, ray_session, qwen_dir,
                                                      tmp_path):
    """Tokenizer actors on two nodes; a worker node holding one (working, or on a loaded
    machine still starting) is killed while the writer (on the head) is writing; the job still
    succeeds and its bytes equal a one-node build's."""
    # Enough input that writing lasts seconds: with the fast encoder, 4,000 samples were all
    # tokenized before the poll below saw the first written byte.
    data = write_jsonl(tmp_path / "t.jsonl", lines_with_groups(alpaca_samples(30000, seed=9)))
    # The one-node build in Ray Data's default blocks and batches (a third faster than the
    # job's small ones, which keep the job running long enough to lose a node): the bytes do
    # not depend on them, so the job must give them all the same.
    build_one_node([data], qwen_dir, tmp_path / "one", packing__mode="sequential",
                   run__workers=2)
    prefix = tmp_path / "multi"
    job = _submit(cluster, [
        "python", "jobs/build.py", "--input", data, "--tokenizer", qwen_dir, "--seq-length",
        str(S), "--packing", "sequential", "--workers", "2", "--batch-size", "16",
        "--block-records", "64", "--output-prefix", str(prefix), "--no-progress"])
    try:
        deadline = time.monotonic() + JOB_SECONDS
        written_at_kill, ran = None, set()
        while time.monotonic() < deadline and job.poll() is None:
            partial = glob.glob(f"{prefix}_text_document.tmp-*.bin")
            size = sum(os.path.getsize(p) for p in partial if os.path.exists(p))
            placed = {name for name, titles in cluster.tokenizers().items() if titles}
            ran |= placed
            if size and placed - {"head"}:  # writing has begun; a worker node has a tokenizer
                victim = min(placed - {"head"})
                _kill_tree(cluster.nodes[victim])
                written_at_kill = size
                break
            time.sleep(0.05)
        logs, _ = job.communicate(timeout=JOB_SECONDS)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, logs[-4000:]
    assert written_at_kill, f"no worker node was killed mid-run (tokenizers ran on {ran})"
    assert len(ran) >= 2, ran  # tokenizer actors were placed on several nodes
    assert read(prefix) == read(tmp_path / "one")
    assert os.path.getsize(f"{prefix}_text_document.bin") > written_at_kill


def test_ray_job_stop_ends_the_build_with_nothing_published_or_pending(cluster, qwen_dir,
                                                                       tmp_path):
    """``ray job stop`` mid-upload: the job ends non-zero in one line; no object, no pending
    multipart upload, no temporary file."""
    from object_store import s3_server
    from sftprep.sink import pending_uploads

    # S=1024, one sample a document: the upload starts at 8 MiB (~1,000 documents), a tenth
    # of the way; the rest leaves the stop time to arrive mid-build.
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(10000, seed=3))
    spill = tmp_path / "spill"
    spill.mkdir()
    job_id = f"stop-{uuid.uuid4().hex[:8]}"
    env = _env(cluster.token)
    with s3_server() as store:
        bucket = f"stop-{uuid.uuid4().hex[:8]}"
        store.create_bucket(bucket)
        prefix = f"s3://{bucket}/out/sft"
        subprocess.run(
            ["ray", "job", "submit", "--address", cluster.address, "--working-dir", ROOT,
             "--submission-id", job_id, "--no-wait",
             "--runtime-env-json", json.dumps({"env_vars": store.env}), "--",
             "python", "jobs/build.py", "--input", data, "--tokenizer", qwen_dir,
             "--seq-length", "1024", "--packing", "none", "--output-prefix", prefix,
             "--spill-dir", str(spill), "--workers", "1", "--batch-size", "16",
             "--block-records", "32", "--no-progress"],
            env=env, check=True, capture_output=True, timeout=300)
        deadline = time.monotonic() + JOB_SECONDS
        while time.monotonic() < deadline and not pending_uploads(prefix,
                                                                  store.storage_options):
            time.sleep(0.2)
        assert pending_uploads(prefix, store.storage_options), "no upload started"
        stop = urllib.request.Request(f"{cluster.address}/api/jobs/{job_id}/stop",
                                      method="POST",
                                      headers={"Authorization": f"Bearer {cluster.token}"})
        with urllib.request.urlopen(stop, timeout=60) as reply:  # what `ray job stop` asks
            assert json.load(reply)["stopped"]
        status = ""
        while time.monotonic() < deadline and status not in ("STOPPED", "FAILED", "SUCCEEDED"):
            status = _get(cluster.address, cluster.token, f"/api/jobs/{job_id}")["status"]
            time.sleep(0.5)
        logs = subprocess.run(["ray", "job", "logs", "--address", cluster.address, job_id],
                              env=env, capture_output=True, text=True, timeout=300).stdout
        assert status == "STOPPED", status
        assert "error: the build was stopped (SIGTERM, e.g. ray job stop); nothing " \
               "published" in logs, logs[-3000:]
        assert pending_uploads(prefix, store.storage_options) == []
        assert store.filesystem().find(bucket) == []
    assert os.listdir(spill) == []
