"""The job entry points as a person runs them (subprocesses with their own Ray runtime)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import psutil

from fixtures import alpaca_samples, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def this_tree(env: dict) -> dict:
    """``env`` with this checkout first on PYTHONPATH: a subprocess started outside it imports
    the sftprep under test, not another install (or none: "No module named sftprep")."""
    return {**env, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH")) if p)}


ENV = this_tree({**os.environ, "RAY_AUTH_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"})


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid``'s descendants now, for a test to stop by pid later: Ray's workers run in process
    groups of their own, which a kill of the job's process group does not reach."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def stop_survivors(tree: list[psutil.Process], grace: float) -> None:
    """SIGKILL the processes of ``tree`` still running after ``grace`` seconds (psutil checks
    each is the process it saw, not a reused pid), and wait for them."""
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def run(args: list[str], cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=this_tree(env or ENV),
                          capture_output=True, text=True, timeout=600)


def test_demo_build_with_no_arguments_is_quiet_then_inspect_and_verify(tmp_path):
    """As a new user runs it: no settings that quieten Ray or transformers in the environment;
    stdout has the progress and the summary, stderr has nothing at all."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "RAY_DATA_", "RAY_BACKEND"))}
    done = run([os.path.join(ROOT, "jobs", "build.py")], str(tmp_path), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == []
    lines = done.stdout.splitlines()
    assert lines[0].startswith("[sftprep] no --input: building the demo")
    assert lines[1].startswith("[sftprep] ") and " records, " in lines[1]  # progress
    assert "packing efficiency" in done.stdout and "per source" in done.stdout  # a mixture
    summary = json.loads(lines[-1])["summary"]
    assert summary["samples_written"] > 300 and summary["rejected_records"] == 0
    prefix = str(tmp_path / "output" / "demo_text_document")
    verify = run(["-m", "sftprep", "verify", prefix], str(tmp_path))
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr
    # the build's --output-prefix works as well as the files' prefix
    shown = run(["-m", "sftprep", "inspect", "output/demo", "--doc", "0", "--no-color"],
                str(tmp_path))
    assert shown.returncode == 0 and "⟦<|im_start|>assistant" in shown.stdout
    assert shown.stderr == ""


def test_verbose_brings_back_the_logs_of_ray(qwen_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(4))
    args = [os.path.join(ROOT, "jobs", "build.py"), "--input", data, "--tokenizer", qwen_dir,
            "--output-prefix", str(tmp_path / "o"), "--workers", "1", "-v"]
    done = run(args, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Execution plan of Dataset" in done.stderr  # Ray Data's own log
    assert "core_worker.cc" in done.stderr  # Ray's native core, as the driver prints it


def test_user_errors_are_one_clear_line(tmp_path):
    build = os.path.join(ROOT, "jobs", "build.py")
    done = run([build, "--input", str(tmp_path / "none.jsonl"), "--tokenizer", str(tmp_path),
                "--output-prefix", str(tmp_path / "o")], ROOT)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: input {str(tmp_path / 'none.jsonl')!r} does not exist"]
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(2))
    for name, files in (("empty", {}), ("broken", {"tokenizer.json": '{"model": ',
                                                   "tokenizer_config.json": "{}"})):
        tok = tmp_path / name
        tok.mkdir()
        for file, text in files.items():
            (tok / file).write_text(text)
        done = run([build, "--input", data, "--tokenizer", str(tok),
                    "--output-prefix", str(tmp_path / "o")], ROOT)
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith(f"error: --tokenizer {tok}: no Hugging Face tokenizer loads"), line
    broken = tmp_path / "b_text_document"
    (tmp_path / "b_text_document.idx").write_bytes(b"garbage")
    (tmp_path / "b_text_document.bin").write_bytes(b"")
    done = run(["-m", "sftprep", "verify", str(broken)], ROOT)
    assert done.returncode == 1 and "invalid:" in done.stderr
    for given in (str(tmp_path / "nothere"), str(tmp_path / "nodir" / "x")):
        done = run(["-m", "sftprep", "verify", given], ROOT)
        assert done.returncode == 2
        [line] = done.stderr.splitlines()
        assert line.startswith(f"error: {given}: looked for {given}.bin/.idx and "
                               f"{given}_text_document.bin/.idx; "), line


def test_help_shows_defaults_required_flags_and_the_demo():
    done = run([os.path.join(ROOT, "jobs", "build.py"), "--help"], ROOT)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    for expected in ("(default: 2048)", "(default: none)", "(required)", "(repeatable)",
                     "-v, --verbose", "Without --input or --config", "builds the built-in demo"):
        assert expected in text, expected
