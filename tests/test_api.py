"""The Python API and the ``sftprep`` command: keywords as the options, one exception type
whose messages name what the user gave, a call that leaves the process as it found it, and a
command line that answers a typo in one line and shows only sftprep's own progress."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

import sftprep
from fixtures import alpaca_samples, write_jsonl
from test_jobs import ENV, ROOT, run


def python(code: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return run(["-c", code], cwd)


def test_import_is_light():
    done = python("import sys, sftprep; sftprep.Error; "
                  "print(sorted({'ray', 'transformers', 'pandas'} & set(sys.modules)))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_errors_name_the_keyword_given(qwen_dir, tmp_path):
    with pytest.raises(sftprep.Error, match=r"^seq_lenght=4096: unknown option; did you mean "
                                            r"seq_length\?$"):
        sftprep.build(input="x.jsonl", seq_lenght=4096)
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(2))
    given = {"input": data, "tokenizer": qwen_dir, "output_prefix": str(tmp_path / "o")}
    with pytest.raises(sftprep.Error, match=r"^seq_length=1: must be an integer >= 2$"):
        sftprep.build(**given, seq_length=1)
    with pytest.raises(sftprep.Error, match=r"^packing='magic': choose one of"):
        sftprep.build(**given, packing="magic")
    with pytest.raises(sftprep.Error, match=r"^no tokenizer: give tokenizer=DIR"):
        sftprep.build(input=data, output_prefix="o")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("template: {seq_length: 1}\n")
    with pytest.raises(sftprep.Error, match=rf"^{yaml}: template.seq_length: 1: must be"):
        sftprep.build(config=str(yaml), **given)
    yaml.write_text("template: {seq_lenght: 1}\n")
    with pytest.raises(sftprep.Error, match=r"unknown option 'template.seq_lenght'; did you "
                                            r"mean template.seq_length\?$"):
        sftprep.build(config=str(yaml), **given)
    with pytest.raises(sftprep.Error, match="does not exist"):
        sftprep.build(**{**given, "input": str(tmp_path / "none.jsonl")})


def test_command_line_typo_is_one_line_with_a_suggestion():
    for args, line in (
            (["--seq-lenght", "4096"], "error: unrecognized option --seq-lenght; did you mean "
                                       "--seq-length?"),
            (["--seq-len=4096"], "error: unrecognized option --seq-len; did you mean "
                                 "--seq-length?"),  # no abbreviations
            (["--seq-length", "1", "--input", "x", "--tokenizer", ROOT],
             "error: --seq-length 1: must be an integer >= 2")):
        done = run(["-m", "sftprep", "build", *args], ROOT)
        assert (done.returncode, done.stderr.splitlines()) == (2, [line]), done.stderr
    done = run(["-m", "sftprep", "bulid"], ROOT)
    assert done.returncode == 2 and done.stderr.endswith("did you mean build?\n"), done.stderr


def test_installed_command_help():
    """``sftprep build --help`` through the console script's function, and ``python -m``."""
    for args in (["-c", "import sys; from sftprep.cli import console; "
                        "sys.argv = ['sftprep', 'build', '--help']; console()"],
                 ["-m", "sftprep", "build", "--help"]):
        done = run(args, ROOT)
        assert done.returncode == 0, done.stderr
        assert "--seq-length SEQ_LENGTH" in done.stdout and "builds the built-in demo" in \
            " ".join(done.stdout.split())
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert 'sftprep = "sftprep.cli:console"' in f.read()
    stats = run(["-m", "sftprep", "stats", "--help"], ROOT)
    assert stats.returncode == 0 and "--output-dir" in stats.stdout


def _state() -> dict:
    """What a build must leave as it found it: Ray Data's context and Ray's loggers (the
    libraries imported first: what their import sets up stays, as any import's does)."""
    import ray.data
    import transformers  # noqa: F401
    ctx = ray.data.DataContext.get_current()
    loggers = {n: (lg.level, [(type(h).__name__, h.level, h.formatter) for h in lg.handlers])
               for n in ("ray", "ray.data", "transformers") for lg in [logging.getLogger(n)]}
    return {"context": (id(ctx), ctx.enable_progress_bars, ctx.target_max_block_size,
                        ctx.execution_options.preserve_order,
                        ctx.execution_options.resource_limits),
            "loggers": loggers, "environ": {k: os.environ.get(k) for k in
                                            ("TRANSFORMERS_NO_ADVISORY_WARNINGS",)},
            "stderr": os.fstat(2).st_ino}


@pytest.fixture(scope="module")
def two_builds(ray_session, qwen_dir, tmp_path_factory):
    """Two builds of one input in this process: the state before, after, and both results."""
    tmp_path = tmp_path_factory.mktemp("two")
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(40, seed=5))
    before = _state()
    results = [sftprep.build(input=[data], tokenizer=qwen_dir, seq_length=256, packing="bfd",
                             output_prefix=str(tmp_path / name), workers=1, progress=False)
               for name in ("a", "b")]
    return tmp_path, before, _state(), results


def test_two_builds_in_one_process_same_bytes_and_process_kept(two_builds):
    tmp_path, before, after, results = two_builds
    assert after == before
    a, b = (open(r.files["bin"], "rb").read() + open(r.files["idx"], "rb").read()
            for r in results)
    assert a == b and len(a) > 0
    r = results[0]
    assert r.summary["samples_written"] == 40 and r.trainer["safe"]
    assert r.data_path == str(tmp_path / "a_text_document")
    assert "packing efficiency" in str(r) and repr(r).startswith("<BuildResult ")
    figures = sftprep.verify(r.data_path)
    assert figures["documents"] == r.summary["documents"]
    shown = sftprep.inspect(str(tmp_path / "a"), doc=0)
    assert "⟦" in shown.text and "<mark" in shown._repr_html_()
    with pytest.raises(sftprep.Error, match=r"^doc=99999: the file has"):
        sftprep.inspect(str(tmp_path / "a"), doc=99999)
    with pytest.raises(sftprep.Error, match="looked for"):
        sftprep.verify(str(tmp_path / "nothere"))


def test_verify_and_inspect_never_import_ray(two_builds):
    prefix = two_builds[3][0].data_path  # any build's output
    done = python("import sys\nfrom sftprep.cli import main\n"
                  f"codes = [main(['verify', {prefix!r}]), main(['inspect', {prefix!r}])]\n"
                  "print(codes, 'ray' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[0, 0] False", done.stdout
    assert done.stdout.startswith("ok: ")


def test_terminal_build_shows_one_bar_and_no_ray_data_bars(qwen_dir, tmp_path):
    """On a terminal (a pty): sftprep's bar, ending on the summary's figures; Ray Data's own
    bars and "Active & requested resources" lines only with -v."""
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(30, seed=1))
    args = [sys.executable, "-m", "sftprep", "build", "--input", data, "--tokenizer", qwen_dir,
            "--seq-length", "256", "--output-prefix", str(tmp_path / "o"), "--workers", "1"]
    text = _on_a_terminal(args, str(tmp_path))
    assert "[sftprep] read tasks" in text and "1/1" in text, text[-3000:]
    for ray_data in ("Active & requested resources", "ReadSFTRecords", "MapBatches",
                     "Running Dataset"):
        assert ray_data not in text, text[-3000:]
    assert "packing efficiency" in text
    last_bar = [line for line in text.replace("\r", "\n").splitlines()
                if line.startswith("[sftprep] read tasks")][-1]
    assert "30 samples in; 30 documents" in last_bar, last_bar


def _on_a_terminal(args: list[str], cwd: str) -> str:
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns
    proc = subprocess.Popen(args, cwd=cwd, env=ENV, stdin=child,
                            stdout=child, stderr=child, close_fds=True)
    os.close(child)
    out = b""
    while True:
        ready, _, _ = select.select([parent], [], [], 600)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # the pty closes when the build exits
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(parent)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")
