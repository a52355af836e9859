"""``python -m sftprep inspect PREFIX [--doc K]`` and ``python -m sftprep verify PREFIX``."""

from __future__ import annotations

import argparse
import os
import sys

from sftprep import idxmap, tokenizer_files, trainer, view


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sftprep")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help in (("inspect", "print documents decoded, trained text marked"),
                       ("verify", "check every invariant of the SFT layout")):
        c = sub.add_parser(name, help=help)
        c.add_argument("prefix", help="the files' prefix, e.g. output/demo_text_document "
                       "(the build's --output-prefix, or a file's name, works too)")
        c.add_argument("--tokenizer", help="tokenizer directory, oss:// or s3:// directory, or "
                       "hub id (default: the manifest's, a hub id at the commit the build used)")
        if name == "verify":
            c.add_argument("--trainer-mode", choices=("any", *trainer.MODES), default="any",
                           help="fail unless the files are safe for this trainer mode: packed "
                           "(MP_SFT_PACKING=true), unpacked, or any of them")
        if name == "inspect":
            c.add_argument("--doc", type=int, action="append",
                           help="document index (repeatable; default: 0)")
            c.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    try:
        args.prefix = view.find_prefix(args.prefix)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    manifest_tok = view.manifest_of(args.prefix).get("tokenizer", {})
    tok_path = args.tokenizer or tokenizer_files.pinned(manifest_tok)
    tok = None
    if tok_path:
        from sftprep.config import ConfigError
        from sftprep.template import load_tokenizer
        try:
            tok = load_tokenizer(tokenizer_files.resolve(tok_path).path,
                                 manifest_tok.get("pad_token"))
        except (ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if args.command == "verify":
            figures = view.verify(args.prefix, tok)
            trainer.require(figures["trainer"], args.trainer_mode)
            print(f"ok: {args.prefix}: {figures['documents']:,} documents, {figures['samples']:,} "
                  f"samples, {figures['tokens']:,} tokens, {figures['pad']:,} pad, "
                  f"S={figures['seq_length']}")
            print("trainer: " + trainer.modes_text(figures["trainer"]))
            return 0
        if tok is None:
            p.error("inspect needs --tokenizer (no manifest names one)")
        reader = idxmap.IndexedReader(args.prefix)
        color = sys.stdout.isatty() if args.color is None else args.color
        for k in args.doc or [0]:
            if not 0 <= k < len(reader):
                p.error(f"--doc {k}: the file has {len(reader)} documents")
            print(view.describe_document(reader, k, tok, color))
        return 0
    except (idxmap.LayoutError, FileNotFoundError) as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
