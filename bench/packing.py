"""Packing efficiency by mode, window and S on real Alpaca data: the data behind --pack-window.

    python bench/packing.py [--data ../shared/data] [--windows 50 100 ...] [--lengths 512 ...]

Token lengths come from the real tokenizer stage (Qwen tokenizer, its chat template) run
in-process over alpaca_en_demo.json + alpaca_zh_demo.json; the packers are the build's own.
Prints efficiency (non-pad tokens / all input slots) and documents per (S, mode/window), and the
packing cost per sample next to the tokenization cost per sample measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pyarrow as pa

from sftprep.demo import qwen_tokenizer_dir
from sftprep.packing import Piece, make_packer
from sftprep.sources import record_table
from sftprep.tokenize import Tokenize, TokenizeSpec

HERE = os.path.dirname(os.path.abspath(__file__))


def token_lengths(paths: list[str]) -> tuple[list[int], float]:
    """Full token length of every sample, and the tokenizer stage's seconds per sample."""
    raw = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            raw += [json.dumps(x, ensure_ascii=False).encode() for x in json.load(f)]
    stage = Tokenize(TokenizeSpec(qwen_tokenizer_dir(), 1 << 30))
    t0 = time.perf_counter()
    out = stage(record_table(0, 0, [(i + 1, -1, text) for i, text in enumerate(raw)]))
    per_sample = (time.perf_counter() - t0) / len(raw)
    return out["tokens"].to_pylist(), per_sample


def pack(lengths: list[int], mode: str, S: int, window: int) -> tuple[int, float, float]:
    """(documents, efficiency, seconds per sample) packing ``lengths`` cut to S, one per line."""
    packer = make_packer(mode, S, window)
    docs, used = 0, 0
    t0 = time.perf_counter()
    for n in lengths:
        docs += sum(1 for _ in packer.add([Piece(min(n, S))]))
        used += min(n, S)
    docs += sum(1 for _ in packer.flush())
    return docs, used / (docs * S), (time.perf_counter() - t0) / len(lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--windows", type=int, nargs="+", default=[50, 100, 200, 500, 1000, 2000,
                                                               5000])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    args = ap.parse_args()
    files = [os.path.join(args.data, n) for n in ("alpaca_en_demo.json", "alpaca_zh_demo.json")]
    lengths, tokenize_cost = token_lengths(files)
    print(f"{len(lengths)} samples, mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"max {max(lengths)}; tokenizer stage {tokenize_cost * 1e6:.0f} us/sample\n")
    cols = ["none", "sequential"] + [f"bfd w={w}" for w in args.windows]
    print(f"{'S':>6} " + " ".join(f"{c:>11}" for c in cols))
    worst_cost = 0.0
    for S in args.lengths:
        cells = []
        for col in cols:
            mode, _, w = col.partition(" w=")
            docs, eff, cost = pack(lengths, mode, S, int(w or 1))
            worst_cost = max(worst_cost, cost)
            cells.append(f"{eff:6.2%} {docs:>4}")
        print(f"{S:>6} " + " ".join(f"{c:>11}" for c in cells))
    print(f"\npacking cost: at most {worst_cost * 1e6:.1f} us/sample = "
          f"{worst_cost / tokenize_cost:.2%} of the tokenizer stage's cost per sample")


if __name__ == "__main__":
    main()
