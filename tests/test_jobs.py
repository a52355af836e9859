"""The job entry points as a person runs them (subprocesses with their own Ray runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"}


def run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_demo_build_with_no_arguments_then_inspect_and_verify(tmp_path):
    done = run([os.path.join(ROOT, "jobs", "build.py")], str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "packing efficiency" in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])["summary"]
    assert summary["samples_written"] > 300 and summary["rejected_records"] == 0
    prefix = str(tmp_path / "output" / "demo_text_document")
    verify = run(["-m", "sftprep", "verify", prefix], str(tmp_path))
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr
    shown = run(["-m", "sftprep", "inspect", prefix, "--doc", "0", "--no-color"], str(tmp_path))
    assert shown.returncode == 0 and "⟦<|im_start|>assistant" in shown.stdout


def test_user_errors_are_one_clear_line(tmp_path):
    done = run([os.path.join(ROOT, "jobs", "build.py"), "--input", str(tmp_path / "none.jsonl"),
                "--tokenizer", str(tmp_path), "--output-prefix", str(tmp_path / "o")], ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        f"error: input {str(tmp_path / 'none.jsonl')!r} does not exist"
    broken = tmp_path / "b_text_document"
    (tmp_path / "b_text_document.idx").write_bytes(b"garbage")
    (tmp_path / "b_text_document.bin").write_bytes(b"")
    done = run(["-m", "sftprep", "verify", str(broken)], ROOT)
    assert done.returncode == 1 and "invalid:" in done.stderr
