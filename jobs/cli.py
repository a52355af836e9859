"""Command-line plumbing shared by the jobs: flags from the config tree, quiet logs, one-line
errors (exit 2 for a user error, 130 for Ctrl-C, 1 when the Ray runtime or a writer is lost)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from sftprep.config import REQUIRED, ConfigError, flags, load
from sftprep import stderr_filter
from sftprep.pipeline import LOST_RUNTIME, BuildFailed, RuntimeLost, abandon_local_runtime
from sftprep.records import RecordError
from sftprep.sources import InputError
from sftprep.template import TemplateError
from sftprep.tokenize import EncodingMismatch
from sftprep.writer import BadRecordError

USER_ERRORS = (ConfigError, InputError, BadRecordError, TemplateError, RecordError,
               FileNotFoundError, EncodingMismatch)


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


_filter: list = []  # the stderr filter to finish at exit (``stderr_filter``)


def _filter_native_stderr() -> None:
    """Route fd 2 through a process that drops Ray's native log lines, passes the rest and,
    when Ray's core ends this process for a lost runtime, prints the one line for it."""
    _filter.append(stderr_filter.start("error: " + LOST_RUNTIME))


def _flush_stderr(restore: bool = True) -> None:
    """Put the terminal back on fd 2 (unless not ``restore``: see ``stderr_filter.finish``)
    and let the filter pass what it still holds."""
    while _filter:
        stderr_filter.finish(_filter.pop(), restore)


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
        _flush_stderr(restore=False)  # Ray's threads log on until the exit: keep filtering
        abandon_local_runtime()
        os._exit(1)
    except BuildFailed as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
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
