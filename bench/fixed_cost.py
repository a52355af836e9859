"""The fixed cost of a build: a two-record build against Ray's own start plus one actor call.

    python bench/fixed_cost.py                 # 3 A/B rounds
    python bench/fixed_cost.py --rounds 5

Each round runs, in fresh interpreters and alternating order, ``bare`` (``ray.init()`` as the
build starts it, one actor created and called once, ``ray.shutdown()``) and ``tiny``
(``python jobs/build.py`` on two Alpaca records, from process start to verified files). Wall
time and the CPU of the whole process tree (``bench.TreeMonitor``) per case; the ratio
tiny/bare per round, and the median over rounds. Results go to ``bench/results/fixed_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import ENV, TreeMonitor  # noqa: E402

BARE = """
import logging, ray
ray.init(log_to_driver=True, logging_level=logging.WARNING, include_dashboard=False)
@ray.remote
class Actor:
    def ping(self):
        return 1
assert ray.get(Actor.remote().ping.remote()) == 1
ray.shutdown()
"""


def run(cmd: list[str]) -> dict:
    with TreeMonitor(pss_every=10**9) as mon:
        proc = subprocess.run(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:])
    f = mon.figures()
    return {"seconds": f["seconds"], "cpu_seconds": f["cpu_seconds"],
            "foreign_cpu_share": f["foreign_cpu_share"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokenizer", help="default: the demo Qwen tokenizer")
    p.add_argument("--out", default=os.path.join(HERE, "results", "fixed_cost.json"))
    args = p.parse_args()
    if args.tokenizer is None:
        from sftprep.demo import qwen_tokenizer_dir
        args.tokenizer = qwen_tokenizer_dir()
    work = tempfile.mkdtemp(prefix="sftprep-fixed-")
    data = os.path.join(work, "two.jsonl")
    with open(data, "w") as f:
        f.write('{"instruction": "Say hi.", "input": "", "output": "Hi!"}\n'
                '{"instruction": "请说你好。", "input": "", "output": "你好！"}\n')
    build = [sys.executable, os.path.join(HERE, "..", "jobs", "build.py"), "--input", data,
             "--tokenizer", args.tokenizer, "--output-prefix", os.path.join(work, "out"),
             "--overwrite", "--no-progress"]
    cases = {"bare": [sys.executable, "-c", BARE], "tiny": build}
    rounds = []
    for r in range(args.rounds):
        order = ["bare", "tiny"] if r % 2 == 0 else ["tiny", "bare"]
        got = {case: run(cases[case]) for case in order}
        got["wall_ratio"] = round(got["tiny"]["seconds"] / got["bare"]["seconds"], 2)
        got["cpu_ratio"] = round(got["tiny"]["cpu_seconds"] / got["bare"]["cpu_seconds"], 2)
        rounds.append(got)
        print(f"round {r + 1}: bare {got['bare']['seconds']:.1f}s ({got['bare']['cpu_seconds']:.1f}"
              f" CPU s), tiny build {got['tiny']['seconds']:.1f}s "
              f"({got['tiny']['cpu_seconds']:.1f} CPU s): {got['wall_ratio']:.2f}x wall, "
              f"{got['cpu_ratio']:.2f}x CPU; other processes "
              f"{max(got[c]['foreign_cpu_share'] for c in cases):.0%} of the machine", flush=True)
    summary = {k: statistics.median(r[k] for r in rounds) for k in ("wall_ratio", "cpu_ratio")}
    print(f"median over {len(rounds)} rounds: the two-record build takes {summary['wall_ratio']:.2f}x"
          f" the wall time and {summary['cpu_ratio']:.2f}x the CPU of ray.init() plus one actor "
          f"call (goal: within 2x)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rounds": rounds, "median": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
