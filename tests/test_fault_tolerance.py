"""Killing a tokenizer actor mid-run loses and duplicates nothing: the bytes do not change."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import psutil

from fixtures import alpaca_samples, lines_with_groups, write_jsonl
from test_pipeline import build, read


def busy_tokenizer_actors() -> list[int]:
    """Tokenizer actors of this session's Ray runtime (its raylet is our child) past __init__."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:  # a worker that exited while we looked
            continue
        if "MapWorker" in title and "__init__" not in title:
            pids.append(p.pid)
    return pids


def test_killed_tokenizer_actor_is_replaced_and_output_is_identical(ray_session, qwen_dir,
                                                                     tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", lines_with_groups(alpaca_samples(4000, seed=9)))
    options = dict(packing__mode="sequential", run__workers=2, run__batch_size=16,
                   run__block_records=64)
    build([path], qwen_dir, tmp_path / "calm", **options)

    killed: list[int] = []

    def kill_when_writing():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            started = glob.glob(str(tmp_path / "hit_text_document.tmp-*.bin"))
            pids = busy_tokenizer_actors()
            if started and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_writing)
    killer.start()
    manifest = build([path], qwen_dir, tmp_path / "hit", **options)
    killer.join()
    assert killed, "the run ended before a tokenizer actor could be killed mid-run"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == "zombie"
    assert read(tmp_path / "hit") == read(tmp_path / "calm")
    assert manifest["summary"]["samples_written"] == 4000
