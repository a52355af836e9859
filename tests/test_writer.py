"""The ordered writer without Ray: groups across blocks, order, packing fuzz, atomic publish."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftprep.idxmap import IndexedReader, LayoutError, check_sft_layout
from sftprep.packing import MODES
from sftprep.sources import ReadRange
from sftprep.tokenize import SCHEMA
from sftprep.writer import BadRecordError, SFTWriter

S, PAD = 32, 1000


def sample(length: int, seed: int) -> tuple[list[int], list[int]]:
    """Input ids and trained ranges as the tokenizer stage makes them (second half trained)."""
    ids = np.random.default_rng(seed).integers(1, 900, length)
    ids[-1] = -1 - ids[-1]
    return ids.tolist(), [length // 2 + 1, length] if length // 2 + 1 < length else []


def table(rows: list[dict]) -> pa.Table:
    full = []
    for r in rows:
        row = {"task": 0, "element": -1, "sample": 0, "status": "ok", "reason": None,
               "detail": None, "text": None,
               "prompt_tokens": 0, "input_ids": [], "trained": [], **r}
        row.setdefault("tokens", len(row["input_ids"]))
        full.append(row)
    return pa.Table.from_pylist(full, schema=SCHEMA)


def writer(tmp_path, **kw) -> SFTWriter:
    return SFTWriter(str(tmp_path / "o_text_document"), ["data.jsonl"], S, PAD, **kw)


def tasks(*files: int, urls=("data.jsonl", "data.json")) -> list[ReadRange]:
    """A read plan whose tasks read ``files`` (indices), whole files or parts."""
    return [ReadRange(f, urls[f]) for f in files]


def end(task: int = 0, lines: int = 0, file: int = 0) -> dict:
    """A read task's end row: it read ``lines`` lines."""
    return {"task": task, "file": file, "line": lines, "sample": -1, "status": "end"}


def finish(w: SFTWriter) -> dict:
    w.consume(table([end()]))
    return w.finish({})


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.lists(st.integers(2, S), min_size=1, max_size=4), min_size=1,
                       max_size=25),
       mode=st.sampled_from(MODES), cuts=st.lists(st.integers(1, 10), max_size=8))
def test_every_sample_lands_once_and_the_file_verifies(tmp_path_factory, groups, mode, cuts):
    tmp = tmp_path_factory.mktemp("w")
    rows, samples = [], []
    for line, g in enumerate(groups, start=1):
        for k, length in enumerate(g):
            ids, trained = sample(length, len(samples))
            samples.append(ids)
            rows.append({"file": 0, "line": line, "sample": k, "input_ids": ids, "trained": trained})
    w = writer(tmp, packing=mode, pack_window=5)
    start = 0
    for cut in cuts + [len(rows)]:  # arbitrary block boundaries, even inside a group
        w.consume(table(rows[start:start + cut]))
        start += cut
        if start >= len(rows):
            break
    manifest = finish(w)
    reader = IndexedReader(str(tmp / "o_text_document"))
    check_sft_layout(reader, S, PAD)
    found = []
    for k in range(len(reader)):
        inputs = reader.document(k)[:S]
        ends = np.flatnonzero(inputs < 0)
        found += [inputs[a:b + 1].tolist() for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
    assert sorted(found) == sorted(samples)
    assert manifest["summary"]["samples_written"] == len(samples)


def test_a_group_split_across_blocks_stays_one_group(tmp_path):
    w = writer(tmp_path, packing="none")
    a, b = sample(5, 1), sample(6, 2)
    w.consume(table([{"file": 0, "line": 1, "sample": 0, "input_ids": a[0], "trained": a[1]}]))
    w.consume(table([{"file": 0, "line": 1, "sample": 1, "input_ids": b[0], "trained": b[1]}]))
    assert finish(w)["summary"]["documents"] == 1


def test_out_of_order_blocks_are_refused(tmp_path):
    w = writer(tmp_path)
    a = sample(5, 1)
    w.consume(table([{"file": 0, "line": 2, "input_ids": a[0], "trained": a[1]}]))
    with pytest.raises(RuntimeError, match="out of order"):
        w.consume(table([{"file": 0, "line": 1, "input_ids": a[0], "trained": a[1]}]))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_a_document_that_breaks_the_contract_is_never_written(tmp_path):
    """The writer checks every document before writing it (not by reading the .bin back)."""
    w = writer(tmp_path)
    ids, trained = sample(6, 1)
    ids[-1] = -1 - ids[-1]  # no sample boundary
    w.consume(table([{"file": 0, "line": 1, "input_ids": ids, "trained": trained}]))
    with pytest.raises(LayoutError, match="document 0, position 0: no sample boundary"):
        finish(w)
    assert os.path.getsize(w.files.tmp + ".bin") == 0
    w.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("element, where", [(-1, r"data\.jsonl:7"),
                                            (3, r"data\.jsonl:7 element 3")])
def test_fail_policy_names_file_and_line(tmp_path, element, where):
    w = writer(tmp_path)
    with pytest.raises(BadRecordError, match=where + ": invalid JSON: boom"):
        w.consume(table([{"file": 0, "line": 7, "element": element, "sample": -1,
                          "status": "rejected", "reason": "invalid JSON", "detail": "boom",
                          "text": "{"}]))


def test_lines_of_a_split_file_are_counted_across_its_read_tasks(tmp_path):
    """Task 1 continues data.jsonl after task 0's 5 lines; task 2 starts data.json; task 3
    continues it, elements of one line named by index."""
    w = SFTWriter(str(tmp_path / "o_text_document"), ["data.jsonl", "data.json"], S, PAD,
                  on_error="skip", plan=tasks(0, 0, 1, 1))
    bad = {"sample": -1, "status": "rejected", "reason": "invalid JSON", "detail": "x", "text": "{"}
    a = sample(5, 1)
    w.consume(table([{"file": 0, "line": 2, "input_ids": a[0], "trained": a[1]}, end(0, 5),
                     {**bad, "task": 1, "file": 0, "line": 3}]))
    w.consume(table([end(1, 4), end(2, 7, file=1),
                     {**bad, "task": 3, "file": 1, "line": 1, "element": 2}, end(3, 1, file=1)]))
    summary = w.finish({})["summary"]
    assert summary["records"] == 3 and summary["rejected_records"] == 2
    with open(tmp_path / "o_text_document.rejects.jsonl", encoding="utf-8") as f:
        where = [{k: v for k, v in json.loads(x).items() if k in ("file", "line", "element")}
                 for x in f]
    assert where == [{"file": "data.jsonl", "line": 8},
                     {"file": "data.json", "line": 8, "element": 2}]


@pytest.mark.parametrize("rows, error", [
    ([end(0, 1), end(2, 1)], "read task 2 arrived after task 0 ended"),
    ([{"task": 1, "line": 1}], "read task 1 arrived after task -1 ended"),
    ([end(0, 1), {"task": 0, "line": 9}], "read task 0 arrived after task 0 ended"),
    ([end(0, 1)], "read task 1 of 2 never ended"),
    ([{"task": 0, "line": 1}, end(0, 1), end(1, 0), {"task": 1, "line": 2}], "after task 1"),
])
def test_a_read_task_missing_or_out_of_place_is_refused(tmp_path, rows, error):
    w = SFTWriter(str(tmp_path / "o_text_document"), ["data.jsonl"], S, PAD,
                  plan=tasks(0, 0))
    ids, trained = sample(5, 1)
    with pytest.raises(RuntimeError, match=error):
        w.consume(table([{"file": 0, "input_ids": ids, "trained": trained, **r} for r in rows]))
        w.finish({})
    w.abort()


def test_publish_replaces_the_index_first_and_leaves_no_temporaries(tmp_path):
    prefix = tmp_path / "o_text_document"
    for suffix in (".bin", ".idx", ".manifest.json"):
        (tmp_path / f"o_text_document{suffix}").write_text("stale")
    w = writer(tmp_path)
    a = sample(5, 1)
    w.consume(table([{"file": 0, "line": 1, "input_ids": a[0], "trained": a[1]}]))
    finish(w)
    assert sorted(os.listdir(tmp_path)) == ["o_text_document.bin", "o_text_document.idx",
                                            "o_text_document.manifest.json"]
    assert len(IndexedReader(str(prefix))) == 1


def test_without_packing_the_summary_says_what_bfd_would_write(tmp_path):
    """``bfd_documents`` is what a bfd build of the same samples writes, and the summary
    advises packing when most of the file is padding."""
    from sftprep.report import summary_text
    rng = np.random.default_rng(5)
    rows = []
    for line in range(1, 120):
        for k in range(1 if line % 4 else 3):  # every fourth line a pre-packed list of three
            ids, trained = sample(int(rng.integers(2, S // 3)), line * 10 + k)
            rows.append({"file": 0, "line": line, "sample": k, "input_ids": ids,
                         "trained": trained})
    summaries = {}
    for mode in ("none", "bfd"):
        w = SFTWriter(str(tmp_path / f"{mode}_text_document"), ["data.jsonl"], S, PAD,
                      packing=mode, pack_window=16)
        for at in range(0, len(rows), 50):
            w.consume(table(rows[at:at + 50]))
        summaries[mode] = finish(w)
    none, bfd = summaries["none"]["summary"], summaries["bfd"]["summary"]
    assert none["bfd_documents"] == bfd["documents"] < none["documents"]
    assert "bfd_documents" not in bfd
    text = summary_text(summaries["none"])
    assert none["pad_fraction"] > 0.5
    assert (f"--packing bfd would write {bfd['documents']} documents instead of "
            f"{none['documents']}") in text and "MP_SFT_PACKING=true" in text
    assert "advice" not in summary_text(summaries["bfd"])
