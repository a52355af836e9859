"""Chat-template rendering per conversation: plain Jinja against traces (``sftprep.trace``).

    python bench/render.py                       # the Qwen tokenizer's template, /work/shared/data
    python bench/render.py --rounds 5 --data DIR
    python bench/render.py --stage               # the Tokenize stage, Jinja against traced

Times the whole ``ChatRenderer`` call (full render, prefix renders, turn boundaries) over every
conversation of a set, CPU time of this thread (``time.process_time``), in rounds that alternate
Jinja and traced (A/B), and reports the best round of each, their ratio, and how many renders the
traced renderer left to Jinja (a fresh one per round, so tracing is timed too: shapes met for
the first time, guard outcomes not seen before, shapes it cannot trace); then the same renderer's
second pass (what a long build sees once its shapes are traced). Every conversation's
text and spans are compared first. Sets: the Alpaca EN+ZH demo records repeated to 10k
conversations, the ShareGPT tool-call file, the OpenAI messages file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from sftprep.demo import qwen_tokenizer_dir
from sftprep.records import parse_group
from sftprep.template import ChatRenderer, load_tokenizer


def conversations(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    lines = ([json.dumps(r).encode() for r in json.loads(data)] if path.endswith(".json")
             else data.splitlines())
    return [c for line in lines for c in parse_group(line)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("SFTPREP_SHARED_DATA", "/work/shared/data"))
    ap.add_argument("--tokenizer", default=None, help="default: the Qwen tokenizer of the demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stage", action="store_true", help="time the Tokenize stage instead")
    args = ap.parse_args()
    if args.stage:
        return stage(args)
    tok = load_tokenizer(args.tokenizer or qwen_tokenizer_dir())
    alpaca = (conversations(os.path.join(args.data, "alpaca_en_demo.json"))
              + conversations(os.path.join(args.data, "alpaca_zh_demo.json")))
    sets = {"alpaca en+zh (10k)": (alpaca * (10_000 // len(alpaca) + 1))[:10_000],
            "glaive_toolcall_en_demo": conversations(
                os.path.join(args.data, "glaive_toolcall_en_demo.json")),
            "v1_sft_demo": conversations(os.path.join(args.data, "v1_sft_demo.jsonl"))}
    for name, convs in sets.items():
        jinja, check = ChatRenderer(tok, traced=False), ChatRenderer(tok)
        for c in convs:  # identity first
            want, got = jinja(c), check(c)
            assert (want.text, want.trained) == (got.text, got.trained), c.messages
        best = {"jinja": float("inf"), "traced": float("inf"), "warm": float("inf")}
        for _ in range(args.rounds):
            traced = ChatRenderer(tok)  # a fresh one: one pass, as an actor sees its records
            for label, r in (("jinja", jinja), ("traced", traced), ("warm", traced)):
                if label == "warm":
                    first = (traced.traced.rendered, traced.traced.fallbacks)
                t0 = time.process_time()
                for c in convs:
                    r(c)
                best[label] = min(best[label], time.process_time() - t0)
        t = traced.traced
        us = {k: v / len(convs) * 1e6 for k, v in best.items()}
        print(f"{name}: {len(convs)} conversations; per conversation jinja {us['jinja']:.1f} us, "
              f"traced {us['traced']:.1f} us ({best['jinja'] / best['traced']:.2f}x; "
              f"{first[1]} of {first[0]} renders by Jinja, shapes traced "
              f"{sum(1 for v in t.traces.values() if v)}, given up "
              f"{sum(v is None for v in t.traces.values())}), a second pass {us['warm']:.1f} us "
              f"({best['jinja'] / best['warm']:.2f}x; {t.fallbacks - first[1]} of "
              f"{t.rendered - first[0]} by Jinja)")


def stage(args) -> None:
    from sftprep.sources import record_table
    from sftprep.tokenize import Tokenize, TokenizeSpec

    raw = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        with open(os.path.join(args.data, name), encoding="utf-8") as f:
            raw += [json.dumps(r, ensure_ascii=False).encode() for r in json.load(f)]
    with open(os.path.join(args.data, "v1_sft_demo.jsonl"), "rb") as f:
        raw += f.read().splitlines()
    rng, corpus = random.Random(0), []
    while len(corpus) < 20_000:
        rng.shuffle(raw)
        corpus += raw
    batches = [record_table(0, 0, [(i + j + 1, -1, t) for j, t in enumerate(corpus[i:i + 256])])
               for i in range(0, 20_000, 256)]
    spec = TokenizeSpec.of(args.tokenizer or qwen_tokenizer_dir(), 2048)
    setup = Tokenize(spec).setup
    best = {"jinja": float("inf"), "traced": float("inf")}
    for _ in range(args.rounds):
        for label in best:
            s = Tokenize(spec, setup)
            if label == "jinja":
                s.render.traced = None
            t0 = time.process_time()
            for b in batches:
                s(b)
            best[label] = min(best[label], time.process_time() - t0)
    print(f"Tokenize stage, 20k records, {setup.backend} encoder: jinja {best['jinja']:.2f} s, "
          f"traced {best['traced']:.2f} s ({best['jinja'] / best['traced']:.2f}x); traced renders "
          f"by Jinja {s.render.traced.fallbacks} of {s.render.traced.rendered}")


if __name__ == "__main__":
    main()
