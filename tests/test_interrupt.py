"""An interrupted build never leaves a .bin/.idx pair that looks complete, and says so in one
line: Ctrl-C (SIGINT) exits 130 having removed its files; a local Ray runtime killed from
outside ends the build at once with exit 1 and one line, whether the build's watcher or Ray's
core (which ends the driver when it touches the dead raylet) gets there first."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fixtures import alpaca_samples, write_jsonl
from test_jobs import ENV, ROOT, process_tree, stop_survivors


def runtime_processes(pid: int) -> list[psutil.Process]:
    """The GCS and raylet of the local runtime the build at ``pid`` started."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.name() in ("gcs_server", "raylet"):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Enough work that a job is still running when the interruption comes: with the fast
    encoder 3,000 samples were finished and published before the runtime could be killed."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "t.jsonl",
                       alpaca_samples(30000, seed=4))


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL", "runtime killed"])
def test_interrupted_build_leaves_no_complete_looking_output(qwen_dir, data, tmp_path, how):
    if how == "SIGINT" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here (a background job), and so in the build it starts")
    prefix = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "jobs", "build.py"), "--input", data,
         "--tokenizer", qwen_dir, "--seq-length", "256", "--output-prefix", str(prefix),
         "--workers", "1", "--batch-size", "16", "--block-records", "32", "--no-progress"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    tree: list = []  # the job's processes, taken before the interruption
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            partial = glob.glob(f"{prefix}_text_document.tmp-*.bin")
            if partial and os.path.getsize(partial[0]) > 0:
                break
            time.sleep(0.1)
        assert proc.poll() is None, \
            f"the build ended before it could be interrupted: {proc.communicate()[1]}"
        tree = process_tree(proc.pid)
        if how == "runtime killed":
            targets = sorted(runtime_processes(proc.pid), key=lambda p: p.name())
            assert [p.name() for p in targets] == ["gcs_server", "raylet"]
            for p in targets:
                p.kill()
        else:
            os.kill(proc.pid, getattr(signal, how))
        killed = time.time()
        _, stderr = proc.communicate(timeout=120)
        took = time.time() - killed
    finally:  # the driver's group holds its local GCS and raylet; its workers have their own
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_survivors(tree, 0)
    left = sorted(os.path.basename(p) for p in glob.glob(f"{prefix}*"))
    assert not any(n.endswith(("_text_document.bin", "_text_document.idx", ".manifest.json"))
                   for n in left), left
    if how == "SIGKILL":
        return
    if how == "SIGINT":
        assert left == []  # the temporary files are gone too
    else:  # the driver removes them, but a dying runtime's writer may still hold them open
        assert all(".tmp-" in n for n in left), left
    if how == "SIGINT":
        assert (proc.returncode, stderr) == (130, "interrupted; nothing written\n")
    else:  # not the minute Ray's core waits for a lost GCS before it ends the process
        assert proc.returncode == 1 and took < 20, (proc.returncode, took)
        assert re.fullmatch(r"error: the local Ray runtime stopped during the job "
                            r"\((gcs_server|raylet) exited\); nothing written\n", stderr), stderr


def test_a_lost_runtime_ends_the_statistics_in_one_line(qwen_dir, data):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "jobs", "stats.py"), "--input", data,
         "--tokenizer", qwen_dir, "--seq-length", "256", "--workers", "1",
         "--batch-size", "16", "--block-records", "32", "--no-progress"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    tree: list = []  # the job's processes, taken before the runtime is killed
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # until the stage works
            if any("MapWorker" in t and "__init__" not in t for t in _titles(proc.pid)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the statistics ended first: {proc.communicate()[1]}"
        tree = process_tree(proc.pid)
        for p in sorted(runtime_processes(proc.pid), key=lambda p: p.name()):
            p.kill()
        killed = time.time()
        _, stderr = proc.communicate(timeout=120)
        took = time.time() - killed
    finally:
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_survivors(tree, 0)
    assert proc.returncode == 1 and took < 20, (proc.returncode, took)
    assert re.fullmatch(r"error: the local Ray runtime stopped during the job "
                        r"\((gcs_server|raylet) exited\); nothing written\n", stderr), stderr


def _titles(pid: int) -> list[str]:
    """The command lines of ``pid``'s descendants."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            found.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return found
