"""How much one large ``.json`` array costs to split: the driver's scan for cut points
(``plan_reads``) against one task reading the whole array, on a generated array.

    python bench/json_split.py [--mb 200] [--tasks 8] [--indent 2]

Prints MB/s of the scan and of the one-task read, and checks the split reads give the
one-task rows (line, element, bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sftprep.sources import InputFile, plan_reads, plan_records  # noqa: E402


def write_array(path: str, mb: int, indent: int | None) -> None:
    """Alpaca records with brackets, commas and escaped quotes in their strings."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        size, i = 0, 0
        while size < mb << 20:
            rec = {"instruction": f'Explain [x, {{y}}] "quoted" \\ item {i}',
                   "input": "", "output": "word, " * 60 + f"]{i}}}"}
            text = ("," if i else "") + ("\n" if indent else "") + json.dumps(rec, indent=indent)
            f.write(text)
            size += len(text)
            i += 1
        f.write("\n]\n" if indent else "]")


def rows(path: str, plan) -> list:
    """``(line in the file, element, bytes)`` of every record (``sources.plan_records``)."""
    return [(line, element, text) for _, line, element, text in plan_records(plan)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--indent", type=int, default=2, help="0: compact (json.dump)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.json")
        write_array(path, a.mb, a.indent or None)
        f = InputFile(path, os.path.getsize(path))
        mb = f.size / 1e6
        t = time.perf_counter()
        plan = plan_reads([f], -(-f.size // a.tasks))
        scan = time.perf_counter() - t
        t = time.perf_counter()
        whole = rows(path, plan_reads([f], 0))
        one = time.perf_counter() - t
        split = rows(path, plan)
        print(f"{mb:.0f} MB, {len(whole)} elements, {len(plan)} ranges")
        print(f"driver scan for cuts: {scan:.2f} s ({mb / scan:.0f} MB/s)")
        print(f"one task reading it:  {one:.2f} s ({mb / one:.0f} MB/s)")
        print(f"split rows (line, element, bytes) == one task's: {split == whole}")


if __name__ == "__main__":
    main()
