"""Packing efficiency by mode, window and S on real SFT data: the data behind --pack-window.

    python bench/packing.py                                   # the demo files the repo ships
    python bench/packing.py --data /work/shared/data/alpaca_en_demo.json \
        /work/shared/data/alpaca_zh_demo.json                 # the README's table
    python bench/packing.py --windows 50 100 --lengths 512 1024

Token lengths come from the real tokenizer stage (the demo's Qwen tokenizer and its chat
template) run in-process over the files (JSON Lines or JSON arrays; a list line is a pre-packed
group, as in a build); the packers are the build's own. Prints efficiency (non-pad tokens / all
input slots) and documents per (S, mode/window), and the packing cost per sample next to the
tokenization cost per sample measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from itertools import groupby

from sftprep.demo import ALPACA, CHAT, qwen_tokenizer_dir
from sftprep.packing import Piece, make_packer
from sftprep.sources import record_table
from sftprep.tokenize import OK, Tokenize, TokenizeSpec


def raw_records(path: str) -> list[bytes]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return [json.dumps(x, ensure_ascii=False).encode() for x in json.load(f)]
        return [line.strip().encode() for line in f if line.strip()]


def token_lengths(paths: list[str]) -> tuple[list[list[int]], float]:
    """Full token length of every sample, grouped by input line, and the tokenizer stage's
    seconds per sample."""
    raw = [r for p in paths for r in raw_records(p)]
    stage = Tokenize(TokenizeSpec.of(qwen_tokenizer_dir(), 1 << 30))
    t0 = time.perf_counter()
    out = stage(record_table(0, 0, [(i + 1, -1, text) for i, text in enumerate(raw)]))
    rows = [r for r in out.select(["line", "status", "tokens"]).to_pylist() if r["status"] == OK]
    per_sample = (time.perf_counter() - t0) / len(rows)
    return [[r["tokens"] for r in g] for _, g in groupby(rows, key=lambda r: r["line"])], \
        per_sample


def pack(groups: list[list[int]], mode: str, S: int, window: int) -> tuple[int, float, float]:
    """(documents, efficiency, seconds per sample) packing the groups' samples cut to S."""
    packer = make_packer(mode, S, window)
    docs, used, samples = 0, 0, 0
    t0 = time.perf_counter()
    for group in groups:
        pieces = [Piece(min(n, S)) for n in group]
        docs += sum(1 for _ in packer.add(pieces))
        used += sum(p.length for p in pieces)
        samples += len(pieces)
    docs += sum(1 for _ in packer.flush())
    return docs, used / (docs * S), (time.perf_counter() - t0) / samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=[ALPACA, CHAT],
                    help="input files (default: the demo files in sftprep/demo/)")
    ap.add_argument("--windows", type=int, nargs="+", default=[50, 100, 200, 500, 1000, 2000,
                                                               5000])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    args = ap.parse_args()
    groups, tokenize_cost = token_lengths(args.data)
    lengths = [n for g in groups for n in g]
    print(f"{', '.join(map(os.path.basename, args.data))}: {len(lengths)} samples in "
          f"{len(groups)} lines, mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"max {max(lengths)}; tokenizer stage {tokenize_cost * 1e6:.0f} us/sample\n")
    cols = ["none", "sequential"] + [f"bfd w={w}" for w in args.windows]
    print(f"{'S':>6} " + " ".join(f"{c:>11}" for c in cols))
    worst_cost = 0.0
    for S in args.lengths:
        cells = []
        for col in cols:
            mode, _, w = col.partition(" w=")
            docs, eff, cost = pack(groups, mode, S, int(w or 1))
            worst_cost = max(worst_cost, cost)
            cells.append(f"{eff:6.2%} {docs:>4}")
        print(f"{S:>6} " + " ".join(f"{c:>11}" for c in cells))
    print(f"\npacking cost: at most {worst_cost * 1e6:.1f} us/sample = "
          f"{worst_cost / tokenize_cost:.2%} of the tokenizer stage's cost per sample")


if __name__ == "__main__":
    main()
