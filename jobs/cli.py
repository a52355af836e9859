"""Command-line plumbing shared by the jobs: flags from the config tree, clean error exits."""

from __future__ import annotations

import argparse
import logging
import sys

from sftprep.config import ConfigError, flags, load
from sftprep.records import RecordError
from sftprep.sources import InputError
from sftprep.template import TemplateError
from sftprep.tokenize import EncodingMismatch
from sftprep.writer import BadRecordError

USER_ERRORS = (ConfigError, InputError, BadRecordError, TemplateError, RecordError,
               FileNotFoundError, EncodingMismatch)


def parser_for(config_cls, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file filling the same options (see conf/)")
    for flag, dest, f in flags(config_cls):
        kind = str(f.type)
        kw = {"dest": dest, "help": f.metadata["help"], "default": argparse.SUPPRESS}
        if kind != "bool":
            kw["metavar"] = f.name.upper()
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            kw["action"] = "append"
        elif kind.startswith("int"):
            kw["type"] = int
        p.add_argument(flag, **kw)
    return p


def parse(config_cls, description: str, argv: list[str], defaults: dict | None = None):
    args = vars(parser_for(config_cls, description).parse_args(argv))
    yaml_path = args.pop("config", None)
    return load(config_cls, yaml_path, {**(defaults or {}), **args})


def run(main) -> None:
    """Call ``main()``; a user error prints one clear message and exits 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except Exception as e:  # unwrap errors raised inside Ray tasks and actors
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, USER_ERRORS):
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        raise
