"""A real cluster: ``ray start --head``, then ``ray job submit --working-dir`` the build, as the
README does it.

The cluster is a second one beside the session runtime of the other tests: its own ports and
``--temp-dir``. It is stopped by signalling the ``ray start --block`` process this test started,
never with ``ray stop``, which kills every Ray process on the machine (the session runtime too).

Token authentication, as Ray 2.60 turns it on for a head that finds ~/.ray/auth_token: both
commands get ``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN``; a client without the token
is refused.
"""

from __future__ import annotations

import contextlib
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
from typing import Iterator

import psutil

from fixtures import alpaca_samples, write_jsonl

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
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@contextlib.contextmanager
def ray_cluster(token: str) -> Iterator[str]:
    """A one-node cluster with 2 CPUs and a dashboard; yields the dashboard's address."""
    gcs, dashboard, agent, client = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths are limited
    log = os.path.join(temp_dir, "ray-start.log")
    env = _env(token)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop now, don't drain 30 s
    with open(log, "w") as out:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
             "--dashboard-port", str(dashboard), "--include-dashboard=true",
             "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
             "--temp-dir", temp_dir, "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address, token, head, log)
        yield address
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_builds_on_a_started_cluster(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_samples(12, seed=4))
    prefix = tmp_path / "out" / "sft"
    token = uuid.uuid4().hex
    build = ["python", "jobs/build.py", "--input", data, "--tokenizer", qwen_dir,
             "--seq-length", "256", "--packing", "bfd", "--output-prefix", str(prefix),
             "--workers", "1", "--no-progress"]
    with ray_cluster(token) as address:
        submit = ["ray", "job", "submit", "--address", address, "--working-dir", ROOT, "--"]
        refused = subprocess.run(["ray", "job", "list", "--address", address], env=_env(None),
                                 capture_output=True, text=True, timeout=120)
        job = subprocess.run(submit + build, env=_env(token), capture_output=True, text=True,
                             timeout=JOB_SECONDS)
    assert refused.returncode != 0 and "Authentication" in refused.stderr + refused.stdout
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]
    assert "records read" in job.stdout and "verified" in job.stdout
    verify = subprocess.run([sys.executable, "-m", "sftprep", "verify", f"{prefix}_text_document"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith("ok:") and "12 samples" in verify.stdout
