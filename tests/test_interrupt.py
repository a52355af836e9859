"""An interrupted build never leaves a .bin/.idx pair that looks complete."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from fixtures import alpaca_samples, write_jsonl
from test_jobs import ENV, ROOT


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_build_leaves_no_complete_looking_output(qwen_dir, tmp_path, sig):
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(3000, seed=4))
    prefix = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "jobs", "build.py"), "--input", data,
         "--tokenizer", qwen_dir, "--seq-length", "256", "--output-prefix", str(prefix),
         "--workers", "1", "--batch-size", "16", "--block-records", "32", "--no-progress"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            partial = glob.glob(f"{prefix}_text_document.tmp-*.bin")
            if partial and os.path.getsize(partial[0]) > 0:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    finally:  # the driver's local Ray processes share its process group
        time.sleep(2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = sorted(os.path.basename(p) for p in glob.glob(f"{prefix}*"))
    assert not any(n.endswith(("_text_document.bin", "_text_document.idx", ".manifest.json"))
                   for n in left), left
    if sig == signal.SIGINT:  # a clean interrupt also removes the temporary files
        assert left == []
