"""The fixed cost of a build: a two-record build against Ray's own start plus one actor call.

    python bench/fixed_cost.py                 # 3 rounds
    python bench/fixed_cost.py --rounds 5

Each round runs, in fresh interpreters and in rotating order:

- ``bare``: ``ray.init()`` as the build starts it, one actor created and called once,
  ``ray.shutdown()`` (issue 23's baseline);
- ``raydata``: the same start, then the build's shape with nothing in it: a two-row read, an
  actor pool of one running an identity ``map_batches``, its output taken by the driver. What
  Ray Data itself starts for that (its helper actors, a worker for the read) is the floor of
  any build of this shape; it also reports when its output was there (``output_seconds``, from
  process start, before Ray's shutdown);
- ``tiny``: ``python jobs/build.py`` on two Alpaca records, from process start to verified files,
  with the tokenizer prepared by an earlier build (``$SFTPREP_CACHE/prepared``), as every build
  after the first with that tokenizer on the machine;
- ``tiny-first``: the same as the first build of that tokenizer (an empty ``SFTPREP_CACHE``).

Wall time and the CPU of the whole process tree (``bench.TreeMonitor``) per case, the ratios
to ``bare`` per round, and their medians. Results go to ``bench/results/fixed_cost.json``.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
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

RAYDATA = """
import logging, time, psutil, ray
ray.init(log_to_driver=True, logging_level=logging.WARNING, include_dashboard=False)
ray.data.DataContext.get_current().enable_progress_bars = False
class Same:
    def __call__(self, batch):
        return batch
ds = ray.data.range(2).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1),
                                   num_cpus=0.5, batch_format="pyarrow")
assert len(ds.take_all()) == 2
print(f"output_seconds {time.time() - psutil.Process().create_time():.3f}")  # before shutdown
ray.shutdown()
"""


def run(cmd: list[str], env: dict) -> dict:
    with TreeMonitor(pss_every=10**9) as mon:
        proc = subprocess.run(cmd, env={**os.environ, **ENV, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:])
    f = mon.figures()
    out = {"seconds": f["seconds"], "cpu_seconds": f["cpu_seconds"],
           "foreign_cpu_share": f["foreign_cpu_share"]}
    for line in proc.stdout.splitlines():  # what a case says of itself
        if line.startswith("output_seconds "):
            out["output_seconds"] = float(line.split()[1])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokenizer", help="default: the demo Qwen tokenizer")
    p.add_argument("--out", default=os.path.join(HERE, "results", "fixed_cost.json"))
    args = p.parse_args()
    if args.tokenizer is None:
        from sftprep.demo import qwen_tokenizer_dir
        args.tokenizer = qwen_tokenizer_dir()
    work = tempfile.mkdtemp(prefix="sftprep-fixed-")  # its outputs and tokenizer caches
    atexit.register(shutil.rmtree, work, True)
    data = os.path.join(work, "two.jsonl")
    with open(data, "w") as f:
        f.write('{"instruction": "Say hi.", "input": "", "output": "Hi!"}\n'
                '{"instruction": "请说你好。", "input": "", "output": "你好！"}\n')
    build = [sys.executable, os.path.join(HERE, "..", "jobs", "build.py"), "--input", data,
             "--tokenizer", args.tokenizer, "--output-prefix", os.path.join(work, "out"),
             "--overwrite", "--no-progress"]
    cache = os.path.join(work, "cache")
    cases = {"bare": [sys.executable, "-c", BARE], "raydata": [sys.executable, "-c", RAYDATA],
             "tiny": build, "tiny-first": build}
    names, builds = list(cases), ("raydata", "tiny", "tiny-first")
    run(build, {"SFTPREP_CACHE": cache})  # prepares the tokenizer for "tiny"
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = {}
        first = os.path.join(work, f"empty-{r}")  # a cache with nothing in it yet
        for case in order:
            got[case] = run(cases[case], {"SFTPREP_CACHE": first if case == "tiny-first"
                                          else cache})
        for case in builds:
            for k in ("seconds", "cpu_seconds"):
                got[f"{case}_{k}_ratio"] = round(got[case][k] / got["bare"][k], 2)
        rounds.append(got)
        print(f"round {r + 1}: " + ", ".join(
            f"{c} {got[c]['seconds']:.1f}s ({got[c]['cpu_seconds']:.1f} CPU s)" for c in names)
            + "; against bare: " + ", ".join(
            f"{c} {got[f'{c}_seconds_ratio']:.2f}x wall {got[f'{c}_cpu_seconds_ratio']:.2f}x CPU"
            for c in builds) + f"; raydata's output {got['raydata']['output_seconds']:.1f}s "
            f"from process start; other processes "
            f"{max(got[c]['foreign_cpu_share'] for c in cases):.0%} of the machine", flush=True)
    summary = {k: statistics.median(r[k] for r in rounds)
               for k in rounds[0] if k.endswith("_ratio")}
    print(f"median over {len(rounds)} rounds, against ray.init() plus one actor call (wall, "
          f"CPU): the two-record build {summary['tiny_seconds_ratio']:.2f}x, "
          f"{summary['tiny_cpu_seconds_ratio']:.2f}x (goal: 1.5x wall); as the tokenizer's first "
          f"build {summary['tiny-first_seconds_ratio']:.2f}x, "
          f"{summary['tiny-first_cpu_seconds_ratio']:.2f}x; the same shape with nothing in it "
          f"{summary['raydata_seconds_ratio']:.2f}x, {summary['raydata_cpu_seconds_ratio']:.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rounds": rounds, "median": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
