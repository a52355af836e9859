"""Command-line plumbing shared by the jobs: flags from the config tree, quiet logs, one-line
errors (exit 2 for a user error, 130 for Ctrl-C, 1 when the Ray runtime is lost)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import threading

from sftprep.config import REQUIRED, ConfigError, flags, load
from sftprep.pipeline import RuntimeLost, abandon_local_runtime
from sftprep.records import RecordError
from sftprep.sources import InputError
from sftprep.template import TemplateError
from sftprep.tokenize import EncodingMismatch
from sftprep.writer import BadRecordError

USER_ERRORS = (ConfigError, InputError, BadRecordError, TemplateError, RecordError,
               FileNotFoundError, EncodingMismatch)
# Ray's C++ core writes its log lines ("[2026-01-01 12:00:00,000 E 123 123] core_worker.cc:..")
# to the driver's log file in the session directory and, from warnings up, to stderr as well.
RAY_NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [IWE] \d+ \d+\] ")


def _default_text(f: dataclasses.Field) -> str:
    """What --help says after a flag's text: required, or the default when it says anything."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is REQUIRED:
        return "required"
    if isinstance(default, bool):
        return f"default: {'--' if default else '--no-'}{f.metadata['flag'][2:]}"
    return "" if default in (None, [], {}) else f"default: {default}"


def parser_for(config_cls, description: str, epilog: str | None = None
               ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="YAML file setting the same options by section (see conf/); "
                        "flags given here override it")
    for flag, dest, f in flags(config_cls):
        kind = str(f.type)
        note = _default_text(f)
        if kind == "list":
            note = "repeatable" + (f"; {note}" if note else "")
        help = f.metadata["help"] + (f" ({note})" if note else "")
        kw = {"dest": dest, "help": help.replace("%", "%%"), "default": argparse.SUPPRESS}
        if kind != "bool":
            kw["metavar"] = f.name.upper()
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            kw["action"] = "append"
        elif kind.startswith("int"):
            kw["type"] = int
        names = [f.metadata["short"]] if f.metadata.get("short") else []
        p.add_argument(*names, flag, **kw)
    return p


def parse(config_cls, description: str, argv: list[str], defaults: dict | None = None,
          epilog: str | None = None):
    args = vars(parser_for(config_cls, description, epilog).parse_args(argv))
    yaml_path = args.pop("config", None)
    config = load(config_cls, yaml_path, {**(defaults or {}), **args})
    if not config.run.verbose:
        quiet()
    return config


def quiet() -> None:
    """Hide library log noise on the terminal; ``--verbose`` skips this.

    transformers: its advisories ("PyTorch was not found") and warnings, here and in every
    process started from here (set before transformers is imported; the tokenizer actors never
    import it). Ray's native core: its lines are dropped from
    stderr (they are in the session's python-core-driver log). Ray's Python loggers and the
    workers' output: ``pipeline.ensure_ray``.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _filter_native_stderr()


_restore: list = []  # (the terminal's fd, the filter thread) to undo at exit


def _filter_native_stderr() -> None:
    """Route fd 2 through a thread that drops Ray's native log lines and passes the rest."""
    read_fd, write_fd = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as src, os.fdopen(terminal, "wb", buffering=0) as dst:
            for line in src:
                if not RAY_NATIVE_LOG_LINE.match(line):
                    dst.write(line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    _restore.append((terminal, thread))


def _flush_stderr() -> None:
    """Put the terminal back on fd 2 and let the filter pass what it still holds."""
    sys.stderr.flush()
    while _restore:
        terminal, thread = _restore.pop()
        os.dup2(terminal, 2)  # the pipe's last writer closes: the pump reads to the end
        thread.join(timeout=5)


def run(main) -> None:
    """Call ``main()``; every way it ends prints at most one line on stderr.

    A user error exits 2, Ctrl-C 130 (the build has removed its temporary files by then),
    a lost Ray runtime 1; anything else is a bug and keeps its traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    code = 0
    try:
        main()
    except RuntimeLost as e:  # Ray's exit handlers would wait on the dead runtime: skip them
        print(f"error: {e}", file=sys.stderr)
        _flush_stderr()
        abandon_local_runtime()
        os._exit(1)
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        code = 130
    except Exception as e:  # unwrap errors raised inside Ray tasks and actors
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, USER_ERRORS):
            print(f"error: {cause}", file=sys.stderr)
            code = 2
        else:
            raise
    finally:
        _flush_stderr()
    sys.exit(code)
