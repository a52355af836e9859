"""Sources and their selection (#N, samples, fraction, repeat), copies kept apart, per-source
figures: the selection read without Ray, the packers and the writer on plain rows, then a few
builds and a stats run on the shared Ray runtime."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import write_jsonl
from sftprep.config import BuildConfig, ConfigError, load, validate
from sftprep.packing import BestFitPacker, GreedyPacker, Piece
from sftprep.shards import combine_summaries, merge_figures
from sftprep.sources import (Origins, count_records, expand_inputs, mixture_plan, parse_source,
                             permute, plan_reads, read_range, source_key)
from sftprep.writer import SFTWriter
from test_writer import PAD, S, sample, table

ID = re.compile(r"rec-(\w+)-(\d+)")


def record(name: str, i: int) -> dict:
    return {"instruction": f"Say rec-{name}-{i}.", "input": "", "output": f"rec-{name}-{i} ok"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """a.jsonl: 23 records with blank lines between; b.jsonl: 7; c.parquet: 30 rows in row
    groups of 4."""
    d = tmp_path_factory.mktemp("mix")
    with open(d / "a.jsonl", "w", encoding="utf-8") as f:
        for i in range(23):
            f.write(json.dumps(record("a", i)) + "\n" + ("\n" if i % 5 == 0 else ""))
    write_jsonl(d / "b.jsonl", [record("b", i) for i in range(7)])
    pq.write_table(pa.Table.from_pylist([record("c", i) for i in range(30)]), d / "c.parquet",
                   row_group_size=4)
    return {k: str(d / n) for k, n in (("a", "a.jsonl"), ("b", "b.jsonl"), ("c", "c.parquet"))}


def selected(inputs: list, split: int = 0, seed: int = 42) -> list[tuple[int, int, str]]:
    """``(source, copy, record id)`` of every record the read tasks yield, in plan order: the
    read path of a build, without Ray."""
    sources = [parse_source(e) for e in inputs]
    files = expand_inputs(inputs)
    plan = plan_reads(files, split)
    counts = {i: count_records(r, None) for i, r in enumerate(plan) if sources[r.source].counted}
    plan = mixture_plan(plan, sources, counts, seed)
    origins = Origins([f.url for f in files], [r.pass_key for r in plan])
    out = []
    for task, r in enumerate(plan):
        for block in read_range(r, task, None, 5):
            for line, text in zip(block["line"].to_pylist(), block["text"].to_pylist()):
                if text is None:
                    origins.end(task, line)
                    continue
                origins.enter(task)
                out.append((r.source, r.copy, "-".join(ID.search(text.decode()).groups())))
    origins.finish()
    return out


def test_a_selection_on_a_split_array_picks_what_it_picks_unsplit(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([record("j", i) for i in range(60)], indent=2))
    inputs = [f"{path}#25", f"{path}#80"]
    whole, split = selected(inputs), selected(inputs, split=300)
    assert len(plan_reads(expand_inputs([str(path)]), 300)) >= 4
    assert split == whole and len(whole) == 25 + 80


def per_record(rows, source: int) -> Counter:
    return Counter(rid for s, _, rid in rows if s == source)


def test_permute_is_a_bijection_for_any_size():
    for total in (1, 2, 3, 5, 16, 17, 1000, 4099):
        got = permute(np.arange(total, dtype=np.uint64), source_key(3, "x"), total)
        assert sorted(got.tolist()) == list(range(total))


def test_counts_are_exact_for_samples_fraction_repeat_and_hash_n(data):
    rows = selected([data["a"] + "#5", {"path": data["a"], "samples": 50},
                     {"path": data["c"], "fraction": 0.3}, {"path": data["b"], "repeat": 3}])
    assert Counter(s for s, _, _ in rows) == {0: 5, 1: 50, 2: 9, 3: 21}
    assert len(per_record(rows, 0)) == 5
    # 50 of 23: two whole copies and 4 more, each a different record
    assert sorted(Counter(per_record(rows, 1).values()).items()) == [(2, 19), (3, 4)]
    assert len(per_record(rows, 2)) == 9 and set(per_record(rows, 3).values()) == {3}
    # one permutation per path: the 4 records of the remainder are among the 5 of #5 (a larger
    # N only adds records)
    assert {r for r, n in per_record(rows, 1).items() if n == 3} <= set(per_record(rows, 0))


def test_the_choice_depends_on_seed_name_and_position_only(data):
    inputs = [data["a"] + "#9", {"path": data["c"], "samples": 41}, data["b"]]
    whole = selected(inputs)
    # split reads: byte ranges of the JSONL files, single row groups of the Parquet file
    for split in (60, 7):
        assert Counter(selected(inputs, split)) == Counter(whole)
    assert selected(inputs) == whole  # a rerun
    reordered = selected(inputs[::-1])
    for k in range(3):
        assert per_record(reordered, 2 - k) == per_record(whole, k)
    other = selected(inputs, seed=7)
    assert per_record(other, 0) != per_record(whole, 0)
    assert sum(per_record(other, 0).values()) == 9


def test_the_same_data_elsewhere_selects_the_same_records(data, tmp_path):
    """The key is the source's name, not where it sits: a copy in another directory (a mount,
    the demo in another install) takes the same records; a file of another name does not."""
    elsewhere = tmp_path / "mnt" / "data" / os.path.basename(data["a"])
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(data["a"], elsewhere)
    renamed = tmp_path / "renamed.jsonl"
    shutil.copy(data["a"], renamed)
    here = per_record(selected([data["a"] + "#9"]), 0)
    assert per_record(selected([f"{elsewhere}#9"]), 0) == here
    assert per_record(selected([f"{renamed}#9"]), 0) != here


def test_copies_come_in_rounds(data):
    rows = selected([{"path": data["b"], "repeat": 3}, {"path": data["a"], "samples": 30}])
    copies = [c for _, c, _ in rows]
    assert copies == sorted(copies)  # every source's pass 0, then pass 1, ...
    # between two copies of a record: the rest of its pass and the next round's passes before
    # it (round 1: a.jsonl's remainder of 7, then b.jsonl again)
    first = {rid: i for i, (_, c, rid) in reversed(list(enumerate(rows)))}
    again = {i - first[rid] for i, (_, c, rid) in enumerate(rows) if c == 1 and rid[0] == "b"}
    assert again == {7 + 7}


def test_hash_n_names_a_count_unless_the_path_exists(tmp_path):
    literal = write_jsonl(tmp_path / "odd.jsonl#3", [record("x", 0)])
    assert parse_source(literal).path == literal and parse_source(literal).samples is None
    assert parse_source("data/x.jsonl#3").samples == 3
    assert parse_source("data/x#1.jsonl").path == "data/x#1.jsonl"
    assert parse_source({"path": "data/y.jsonl#2", "repeat": 2}).path == "data/y.jsonl#2"


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "samples": 3, "repeat": 2}, "samples and repeat given; choose one"),
    ({"path": "a.jsonl", "samples": 0}, r"samples: 0: must be an integer >= 1"),
    ({"path": "a.jsonl", "fraction": -1}, "must be a number > 0"),
    ({"path": "a.jsonl", "sample": 3}, "unknown key 'sample'"),
    ({"samples": 3}, "give a path"),
])
def test_a_bad_source_entry_is_named(qwen_dir, entry, message):
    config = load(BuildConfig, None, {"source.inputs": ["x.jsonl", entry],
                                      "template.tokenizer": qwen_dir, "output.prefix": "o"})
    with pytest.raises(ConfigError, match=r"source.inputs\[1\].*" + message):
        validate(config)


# -- packers: two copies of a record never share a document --------------------------------------

@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.lists(st.integers(1, 10), min_size=1, max_size=3), min_size=1,
                        max_size=12),
       copies=st.integers(2, 4), window=st.integers(1, 60), seed=st.integers(0, 99))
def test_no_document_holds_two_copies_of_a_record(lengths, copies, window, seed):
    """Records (groups of pieces) each appear ``copies`` times, in any order, even side by
    side; S = 12 is small enough that a document could hold several copies."""
    order = [r for r in range(len(lengths)) for _ in range(copies)]
    np.random.default_rng(seed).shuffle(order)
    for packer in (GreedyPacker(12, per_group=False), BestFitPacker(12, window)):
        docs = []
        for g, r in enumerate(order):
            docs += packer.add([Piece(n, g, ("rec", r)) for n in lengths[r]])
        docs += packer.flush()
        assert sorted(p.payload for d in docs for p in d) == sorted(
            g for g, r in enumerate(order) for _ in lengths[r])
        for doc in docs:
            groups = {}
            for p in doc:
                assert groups.setdefault(p.record, p.payload) == p.payload


def test_without_copies_the_packers_are_unchanged():
    """Records that never repeat pack as pieces without a record do."""
    groups = [[6], [5], [3, 4], [2], [6], [5], [9], [1]]
    for make in (lambda: GreedyPacker(10, per_group=False), lambda: BestFitPacker(10, 4)):
        a, b = make(), make()
        plain = [d for g in groups for d in a.add([Piece(n) for n in g])] + list(a.flush())
        named = [d for k, g in enumerate(groups)
                 for d in b.add([Piece(n, record=k) for n in g])] + list(b.flush())
        assert [[p.length for p in d] for d in plain] == [[p.length for p in d] for d in named]


# -- per-source figures --------------------------------------------------------------------------

def assert_sources_add_up(summary: dict) -> None:
    """Every count of the summary that the sources have is the sum of theirs."""
    sources = summary["sources"]
    for key, value in sources[0].items():
        if key == "source":
            continue
        parts = [s[key] for s in sources]
        if isinstance(value, dict):
            assert sum((Counter(p) for p in parts), Counter()) == Counter(summary[key]), key
        else:
            assert sum(parts) == summary[key], key


def test_the_writer_counts_every_figure_per_source(tmp_path):
    """Task 0 reads source 0 whole, task 1 source 1 (a selection keeping 4 of 9 records), task 2
    source 0 again (its second pass)."""
    from sftprep.sources import ReadRange, Selection
    plan = [ReadRange(0, "data.jsonl"), ReadRange(1, "data.json", source=1,
                                                  select=Selection((1,), 9, 4, 0, 9)),
            ReadRange(0, "data.jsonl", copy=1)]
    w = SFTWriter(str(tmp_path / "o_text_document"), ["data.jsonl", "data.json"], S, PAD,
                  "bfd", 8, "skip", plan=plan, sources=["a", "b"])

    def ok(task, file, line):
        ids, trained = sample(6 + line, line)
        cut = line == 2  # rendered 40 tokens, written len(ids): lost to the cut at S
        return {"task": task, "file": file, "line": line, "input_ids": ids, "trained": trained,
                "tokens": 40 if cut else len(ids), "lost": [40 - len(ids), 0, 0] if cut else []}

    def end(task, file, lines):
        return {"task": task, "file": file, "line": lines, "sample": -1, "status": "end"}

    w.consume(table([ok(0, 0, 1), ok(0, 0, 2), ok(0, 0, 3), end(0, 0, 3),
                     {"task": 1, "file": 1, "line": 1, "sample": -1, "status": "rejected",
                      "reason": "bad", "detail": "x", "text": "{"},
                     ok(1, 1, 2),
                     {"task": 1, "file": 1, "line": 3, "status": "dropped",
                      "reason": "prompt too long", "detail": "x", "text": "{}"},
                     ok(1, 1, 5), end(1, 1, 9)]))
    w.consume(table([ok(2, 0, 1), ok(2, 0, 2), ok(2, 0, 3),
                     {"task": 2, "file": 0, "line": 4, "sample": -1, "status": "rejected",
                      "reason": "bad", "detail": "x", "text": "{"}, end(2, 0, 4)]))
    summary = w.finish({})["summary"]
    with open(tmp_path / "o_text_document.rejects.jsonl", encoding="utf-8") as f:
        # the second pass over data.jsonl counts its lines from the file's start again
        assert [(e["file"], e["line"]) for e in map(json.loads, f) if e["status"] != "cut"] == [
            ("data.json", 1), ("data.json", 3), ("data.jsonl", 4)]
    a, b = summary["sources"]
    assert (a["source"], a["records_read"], a["records"], a["samples_written"]) == ("a", 7, 7, 6)
    assert (b["records_read"], b["records"], b["rejected_records"], b["dropped_samples"],
            b["samples_written"]) == (9, 4, 1, 1, 2)
    assert a["truncated_samples"] == 2 and b["truncated_samples"] == 1
    assert_sources_add_up(summary)
    assert summary["records_read"] == 16 and summary["tokens"] > 0


def test_one_merge_rule_for_shards():
    part = {"records": 3, "samples_per_document_max": 4, "writer_seconds": 1.5,
            "rejected_by_reason": {"bad": 1}, "trainer_safe": True, "seq_length": 8,
            "documents": 2, "tokens": 10, "samples_written": 3, "new_figure": 7,
            "sources": [{"source": "a", "tokens": 6}, {"source": "b", "tokens": 4}]}
    other = {**part, "samples_per_document_max": 6, "writer_seconds": 0.5,
             "rejected_by_reason": {"also": 2}, "new_figure": 1}
    out = combine_summaries([part, other], 4.0)
    assert (out["records"], out["samples_per_document_max"], out["writer_seconds"]) == (6, 6, 1.5)
    assert out["rejected_by_reason"] == {"also": 2, "bad": 1} and out["new_figure"] == 8
    assert out["sources"] == [{"source": "a", "tokens": 12}, {"source": "b", "tokens": 8}]
    assert out["packing_efficiency"] == round(20 / 32, 6) and out["tokens_per_second"] == 5
    with pytest.raises(ValueError, match="seq_length"):
        merge_figures([part, {**other, "seq_length": 16}])


# -- builds and stats on Ray ---------------------------------------------------------------------

def build_ids(prefix: str, tokenizer) -> list[Counter]:
    """The record ids in each document of a build (each sample names its id twice)."""
    from sftprep.idxmap import IndexedReader
    reader = IndexedReader(prefix + "_text_document")
    docs = []
    for k in range(len(reader)):
        row = np.array(reader.document(k), dtype=np.int64)
        ids = row[:row.size // 2]
        ids = np.where(ids < 0, -1 - ids, ids)
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        docs.append(Counter("-".join(m) for m in ID.findall(text)))
    return docs


def mixture_build(data, tmp_path, qwen_dir, name, inputs, **options):
    from sftprep import pipeline
    overrides = {"source.inputs": inputs, "template.tokenizer": qwen_dir,
                 "template.seq_length": 96, "output.prefix": str(tmp_path / name),
                 "run.progress": False, "packing.mode": "bfd", "packing.window": 500}
    overrides.update({k.replace("__", "."): v for k, v in options.items()})
    return pipeline.build(load(BuildConfig, None, overrides))


def test_a_mixture_builds_exactly_the_selection(ray_session, qwen, qwen_dir, data, tmp_path):
    """Exact per-source counts, copies never in one document (bfd with a window larger than
    the sources; sequential), the same records for any workers, split reads or shards (and
    the same bytes for the first two, so on a rerun too)."""
    inputs = [data["a"] + "#40", {"path": data["b"], "repeat": 3},
              {"path": data["c"], "fraction": 0.5}]
    want = Counter(rid for _, _, rid in selected(inputs))
    runs = {"one": {"run__workers": 1, "source__split_bytes": 0},
            "split": {"run__workers": 2, "source__split_bytes": 200, "run__batch_size": 4,
                      "run__block_records": 3},
            "shards": {"output__shards": 2, "packing__mode": "sequential"}}
    manifests = {}
    for name, options in runs.items():
        manifests[name] = m = mixture_build(data, tmp_path, qwen_dir, name, inputs, **options)
        prefixes = [s["prefix"][:-len("_text_document")] for s in m.get("shards", [])] or \
            [str(tmp_path / name)]
        docs = [d for p in prefixes for d in build_ids(p, qwen)]
        assert sum(docs, Counter()) == Counter({r: 2 * n for r, n in want.items()}), name
        assert all(set(d.values()) == {2} for d in docs), name  # no two copies in a document
        s = m["summary"]
        assert [(x["records_read"], x["records"], x["samples_written"]) for x in s["sources"]] \
            == [(46, 40, 40), (21, 21, 21), (30, 15, 15)]  # read: over all passes
        assert_sources_add_up(s)
    with open(tmp_path / "one_text_document.bin", "rb") as a, \
            open(tmp_path / "split_text_document.bin", "rb") as b:
        assert a.read() == b.read()
    assert [x["passes"] for x in manifests["one"]["sources"]] == [[None, 17], [None] * 3, [15]]
    assert manifests["one"]["seed"] == 42  # another seed: test_the_choice_depends_on_...
    # the statistics job projects what the build made, copies held apart as the build does
    from sftprep import lengths
    projected = lengths.run(load(lengths.StatsConfig, None, {
        "source.inputs": inputs, "template.tokenizer": qwen_dir, "template.seq_length": 96,
        "packing.mode": "bfd", "packing.window": 500, "run.progress": False}))["packing"]
    assert projected["bfd"]["docs"] == manifests["one"]["summary"]["documents"]


def test_stats_split_lengths_by_source(ray_session, data, tmp_path):
    from sftprep import lengths
    config = load(lengths.StatsConfig, None, {
        "source.inputs": [data["a"] + "#10", {"path": data["b"], "repeat": 2}],
        "run.progress": False, "run.workers": 1})
    out = lengths.run(config)
    a, b = out["sources"]
    assert (a["records_read"], a["records"], a["samples"]) == (23, 10, 10)
    assert (b["records_read"], b["records"], b["samples"]) == (14, 14, 14)
    assert out["samples"] == a["samples"] + b["samples"] == 24
    assert "selected" in lengths.summary_text(out)
