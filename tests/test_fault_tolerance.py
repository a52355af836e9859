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


def tokenizer_actor_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("MapWorker" in part for part in (p.info["cmdline"] or []))]


def test_killed_tokenizer_actor_is_replaced_and_output_is_identical(ray_session, qwen_dir,
                                                                     tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", lines_with_groups(alpaca_samples(1500, seed=9)))
    options = dict(packing__mode="sequential", run__workers=2, run__batch_size=16,
                   run__block_records=64)
    build([path], qwen_dir, tmp_path / "calm", **options)

    killed: list[int] = []

    def kill_when_writing():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            partial = glob.glob(str(tmp_path / "hit_text_document.tmp-*.bin"))
            pids = tokenizer_actor_pids()
            if partial and os.path.getsize(partial[0]) > 0 and pids:
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
    assert manifest["summary"]["samples_written"] == 1500
