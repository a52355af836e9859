"""No multipart upload outlives a build (loopback S3 and OSS): a writer lost mid-upload ends the
build in one line with its upload aborted; the upload of a driver killed outright is found and
aborted by the next build on the prefix, which says so."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from fixtures import alpaca_samples, write_jsonl
from object_store import oss_server, s3_server
from sftprep import pipeline, runtime
from sftprep.config import BuildConfig, load
from sftprep.sink import pending_uploads
from test_jobs import ENV, ROOT, process_tree, stop_survivors

SERVERS = {"s3": s3_server, "oss": oss_server}
S = 4096  # --packing none: a 32 KiB document a sample, so the .bin passes a part (8 MiB) soon
SAMPLES = 3000  # ~100 MB of .bin: still uploading when it is interrupted


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request):
    with SERVERS[request.param]() as store:
        yield store


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "t.jsonl", alpaca_samples(SAMPLES, 3))


def _prefix(store) -> tuple[str, str]:
    bucket = f"up-{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    return bucket, f"{store.protocol}://{bucket}/out/sft"


def _config(store, data: str, qwen_dir: str, prefix: str) -> BuildConfig:
    return load(BuildConfig, None, {
        "source.inputs": [data], "template.tokenizer": qwen_dir, "template.seq_length": S,
        "packing.mode": "none", "output.prefix": prefix, "output.overwrite": True,
        "source.storage_options": store.storage_options, "run.progress": False,
        "run.workers": 1, "run.batch_size": 16, "run.block_records": 32})


def _wait_for_upload(store, prefix: str, running, seconds: float = 300) -> list:
    deadline = time.time() + seconds
    while time.time() < deadline and running():
        found = pending_uploads(prefix, store.storage_options)
        if found:
            return found
        time.sleep(0.1)
    return []


def _writer_processes() -> list[psutil.Process]:
    """The SFTWriter actors of this session's Ray runtime (its raylet is our child)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "SFTWriter" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_writer_lost_mid_upload_ends_the_build_in_one_line_with_no_upload_pending(
        store, data, ray_session, qwen_dir):
    bucket, prefix = _prefix(store)
    seen: list = []
    done = threading.Event()

    def kill_writer_mid_upload():
        seen.extend(_wait_for_upload(store, prefix, lambda: not done.is_set()))
        for p in _writer_processes():
            p.kill()

    killer = threading.Thread(target=kill_writer_mid_upload)
    killer.start()
    try:
        with pytest.raises(runtime.BuildFailed) as failed:
            pipeline.build(_config(store, data, qwen_dir, prefix))
    finally:
        done.set()
        killer.join()
    assert [url for url, _ in seen] == [prefix + "_text_document.bin"]
    assert "\n" not in str(failed.value) and "writer" in str(failed.value)
    assert pending_uploads(prefix, store.storage_options) == []
    assert not store.filesystem().find(bucket)  # and no object


def test_the_upload_of_a_killed_driver_is_aborted_by_the_next_build(store, data, ray_session,
                                                                    qwen_dir, caplog, tmp_path):
    bucket, prefix = _prefix(store)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "jobs", "build.py"), "--input", data,
         "--tokenizer", qwen_dir, "--seq-length", str(S), "--packing", "none",
         "--output-prefix", prefix, "--workers", "1", "--batch-size", "16",
         "--block-records", "32", "--no-progress"],
        env={**ENV, **store.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        left = _wait_for_upload(store, prefix, lambda: proc.poll() is None)
    finally:  # the driver and the local runtime it started, at once: nobody can abort
        tree = process_tree(proc.pid)  # its workers too, which have process groups of their own
        with contextlib.suppress(ProcessLookupError):  # it ended first: the assert says why
            os.killpg(proc.pid, signal.SIGKILL)
        stop_survivors(tree, 0)
        proc.wait()
    assert left, f"the build ended before its upload could be left: {proc.stderr.read()}"
    assert pending_uploads(prefix, store.storage_options) == left
    # the next build on the prefix (of a few samples: what it writes is not the point)
    few = write_jsonl(tmp_path / "few.jsonl", alpaca_samples(20, 3))
    with caplog.at_level(logging.WARNING, logger="sftprep.outputs"):
        manifest = pipeline.build(_config(store, few, qwen_dir, prefix))
    said = [r.getMessage() for r in caplog.records if "pending upload" in r.getMessage()]
    assert said == [f"[sftprep] aborted 1 pending upload an earlier build left unfinished: "
                    f"{prefix}_text_document.bin"]
    assert manifest["summary"]["samples_written"] == 20
    assert pending_uploads(prefix, store.storage_options) == []
