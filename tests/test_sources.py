"""Reading: line numbers, JSON arrays split while streaming, gz, globs and directories, BOM and
CRLF, Parquet, and large files split into read tasks that give the same records."""

from __future__ import annotations

import gzip
import io
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftprep.sources import (InputError, InputFile, Origins, ReadRange, auto_split_bytes,
                             count_records, expand_inputs, iter_records, plan_reads,
                             plan_records, read_range)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12)


def records(f, is_array_file: bool, **kw) -> list[tuple[int, bytes]]:
    """``(line, bytes)`` of the records, checking the end row comes last and only there."""
    items = list(iter_records(f, is_array_file, **kw))
    assert items[-1][2] is None and all(t is not None for *_, t in items[:-1])
    return [(line, text) for line, _, text in items[:-1]]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(json_values, max_size=12), indent=st.sampled_from([None, 1, 2]),
       chunk=st.integers(1, 64))
def test_array_elements_are_split_exactly(values, indent, chunk):
    text = json.dumps(values, indent=indent, ensure_ascii=False).encode()
    items = list(iter_records(io.BytesIO(text), is_array_file=True, chunk_size=chunk))[:-1]
    assert [element for _, element, _ in items] == list(range(len(values)))
    records = [(line, raw) for line, _, raw in items]
    assert [json.loads(raw) for _, raw in records] == values
    lines = text.split(b"\n")
    for line, raw in records:  # each element starts on the line it is reported at
        assert raw.split(b"\n")[0] in lines[line - 1]


@settings(max_examples=100, deadline=None)
@given(values=st.lists(json_values, min_size=1, max_size=8), cut=st.integers(1, 40),
       chunk=st.integers(1, 64))
def test_truncated_array_loses_no_complete_element(values, cut, chunk):
    text = json.dumps(values, indent=1).encode()
    text = text[:max(1, len(text) - cut)]
    cut_element = object()
    parsed = []
    for _, raw in records(io.BytesIO(text), is_array_file=True, chunk_size=chunk):
        try:
            parsed.append(json.loads(raw))
        except ValueError:
            parsed.append(cut_element)  # handed on, to be rejected with its line
    assert cut_element not in parsed[:-1]
    complete = [v for v in parsed if v is not cut_element]
    assert complete == values[:len(complete)]


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.text(alphabet="ab{}\" \r", max_size=8), max_size=20),
       chunk=st.integers(1, 16))
def test_jsonl_line_numbers_and_blank_lines(lines, chunk):
    text = "\n".join(lines).encode()
    got = records(io.BytesIO(text), is_array_file=False, chunk_size=chunk)
    expected = [(i + 1, l.rstrip("\r").encode()) for i, l in enumerate(lines) if l.strip()]
    assert got == expected


def test_json_file_that_is_really_jsonl_is_read_as_lines():
    text = b'{"a": 1}\n{"a": 2}\n'
    assert records(io.BytesIO(text), is_array_file=True) == [(1, b'{"a": 1}'), (2, b'{"a": 2}')]


def test_expand_inputs_files_dirs_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.jsonl", "d/sub/b.json", "d/c.txt", "e.jsonl"):
        (tmp_path / name).write_text("{}\n")
    with gzip.open(tmp_path / "d" / "z.jsonl.gz", "wt") as f:
        f.write('{"x": 1}\n')
    got = [(f.url, f.source) for f in expand_inputs(
        [str(tmp_path / "d"), str(tmp_path / "*.jsonl"), str(tmp_path / "d" / "*"),
         str(tmp_path / "e.jsonl")])]
    # every input is a source: a file named by two is read for each, in URL order
    assert got == [(str(tmp_path / n), k) for n, k in (
        ("d/a.jsonl", 0), ("d/a.jsonl", 2), ("d/sub/b.json", 0), ("d/z.jsonl.gz", 0),
        ("d/z.jsonl.gz", 2), ("e.jsonl", 1), ("e.jsonl", 3))]
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="matched no"):
        expand_inputs([str(tmp_path / "nothing*.jsonl")])


def test_read_records_blocks_and_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(f'{{"i": {i}}}\n' for i in range(10))
    blocks = list(read_range(ReadRange(3, str(path)), 5, None, block_records=4))
    assert [b.num_rows for b in blocks] == [4, 4, 3]  # 10 records and the end row
    rows = [r for b in blocks for r in b.to_pylist()]
    assert rows[0] == {"task": 5, "file": 3, "line": 1, "element": -1, "text": b'{"i": 0}'}
    assert [r["line"] for r in rows] == list(range(1, 11)) + [10]
    assert rows[-1]["text"] is None  # the end row: the task read 10 lines


def test_bom_and_crlf_read_like_plain_lines_and_arrays():
    plain = [(1, b'{"a": 1}'), (3, b'{"b": 2}')]
    assert records(io.BytesIO(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"b": 2}\r\n'), False) == plain
    assert records(io.BytesIO(b'\xef\xbb\xbf{"a": 1}\n\n{"b": 2}'), False, chunk_size=1) == plain
    compact = b'\xef\xbb\xbf[{"a": 1}, {"b": 2},{"c": [3]}]'
    assert list(iter_records(io.BytesIO(compact), True, chunk_size=2)) == [
        (1, 0, b'{"a": 1}'), (1, 1, b'{"b": 2}'), (1, 2, b'{"c": [3]}'), (0, -1, None)]


def read_task_rows(plan: list[ReadRange], urls: list[str], block_records: int = 3) -> list:
    """``(file url, line or row, element, text)`` of every record, true positions from the
    tasks' end rows as the ordered writer computes them."""
    origins = Origins(urls, [r.file for r in plan])
    out = []
    for task, r in enumerate(plan):
        for block in read_range(r, task, None, block_records):
            for row in block.to_pylist():
                if row["text"] is None:
                    origins.end(task, row["line"])
                else:
                    origins.enter(task)
                    where = origins.locate(row["file"], row["line"], row["element"])
                    out.append((*where.values(), row["text"]))
    origins.finish()
    return out


line_texts = st.lists(st.sampled_from(['{"a": 1}', '{"bb": [1, 2]}', "", " ", "x" * 40, "{",
                                       "\r", '"\u00e9"']), max_size=30)


@settings(max_examples=150, deadline=None)
@given(lines=line_texts, bom=st.booleans(), crlf=st.booleans(), final_newline=st.booleans(),
       split=st.integers(1, 64))
def test_a_file_split_in_byte_ranges_gives_the_same_records_and_lines(tmp_path_factory, lines,
                                                                      bom, crlf, final_newline,
                                                                      split):
    end = "\r\n" if crlf else "\n"
    text = end.join(lines) + (end if final_newline and lines else "")
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    path = str(tmp_path_factory.mktemp("split") / "x.jsonl")
    with open(path, "wb") as f:
        f.write(data)
    files = [InputFile(path, len(data))]
    whole = read_task_rows(plan_reads(files, 0), [path])
    plan = plan_reads(files, split)
    assert len(plan) == max(1, -(-len(data) // split)) and plan[-1].end in (None, len(data))
    assert read_task_rows(plan, [path]) == whole
    assert [w[1] for w in whole] == [i + 1 for i, x in enumerate(lines) if x.strip(" \r")]


def test_a_line_longer_than_a_range_is_read_once(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": "' + b"y" * 100 + b'"}\n{"b": 1}\n')
    files = [InputFile(str(path), path.stat().st_size)]
    plan = plan_reads(files, 10)
    assert len(plan) == 12
    assert read_task_rows(plan, [str(path)]) == read_task_rows(plan_reads(files, 0), [str(path)])


def test_plan_splits_only_large_plain_jsonl_and_parquet(tmp_path):
    big = 100
    (tmp_path / "c.json").write_bytes(b'{"a": 1}\n' * 10)  # JSON Lines in .json: one task
    files = [InputFile(str(tmp_path / n), size) for n, size in (
        ("a.jsonl", big), ("b.jsonl.gz", big), ("c.json", big), ("d.jsonl", 10))]
    plan = plan_reads(files, 30)
    assert [(r.file, r.start, r.end) for r in plan] == [
        (0, 0, 25), (0, 25, 50), (0, 50, 75), (0, 75, 100), (1, 0, None), (2, 0, None),
        (3, 0, None)]
    assert [r.file for r in plan_reads(files, 0)] == [0, 1, 2, 3]
    mib = 1 << 20
    assert auto_split_bytes([InputFile("x", 10 * mib)], 64) == 32 * mib  # small: one task
    assert auto_split_bytes([InputFile("x", 50 << 30)], 100) == -(-(50 << 30) // 400)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(json_values, max_size=12), indent=st.sampled_from([None, 1, 2]),
       lead=st.sampled_from(["", "\ufeff", " \n"]), cut=st.integers(0, 6),
       split=st.integers(1, 64))
def test_an_array_split_in_element_ranges_gives_the_same_rows(tmp_path_factory, values, indent,
                                                               lead, cut, split):
    text = (lead + json.dumps(values, indent=indent, ensure_ascii=False)).encode()
    text = text[:len(text) - min(cut, len(text) - 1)]  # cut > 0: a truncated file
    path = str(tmp_path_factory.mktemp("array") / "x.json")
    with open(path, "wb") as f:
        f.write(text)
    files = [InputFile(path, len(text))]
    plan = plan_reads(files, split)
    assert plan[0].start == 0 and all(a.end == b.start for a, b in zip(plan, plan[1:]))
    assert [r.element for r in plan] == sorted({r.element for r in plan})
    assert read_task_rows(plan, [path]) == read_task_rows(plan_reads(files, 0), [path])
    for r in plan:  # the counting pass counts a range as the reader reads it
        assert count_records(r, None) == sum(
            b.num_rows for b in read_range(r, 0, None, 1 << 10)) - 1


def tricky_records(n: int, bad: int) -> list:
    """Records whose strings hold brackets, commas, braces and escaped quotes; ``bad``: one
    that is valid JSON but not a sample."""
    out = [{"instruction": f'Say [a, {{b}}] "c" \\ d]}}, {i}', "input": "",
            "output": "word, " * 40 + f'"{i}"]'} for i in range(n)]
    out[bad] = 42
    return out


@pytest.fixture(scope="module")
def big_arrays(tmp_path_factory) -> dict:
    """A 40 MB pretty-printed array and a 20 MB compact one (what ``json.dump`` writes; each
    spans dozens of the reader's 1 MiB chunks), each with a bad element at 9/10 of its
    elements."""
    d, out = tmp_path_factory.mktemp("big"), {}
    for name, indent, mb in (("pretty", 2, 40), ("compact", None, 20)):
        path = str(d / f"{name}.json")
        one = json.dumps(tricky_records(2, 1)[0], indent=indent)
        n = (mb << 20) // len(one) + 1
        records = tricky_records(n, n * 9 // 10)
        if indent:  # as json.dump(indent=2) writes flat objects, without its slow encoder
            parts = ["{\n    " + ",\n    ".join(f"{json.dumps(k)}: {json.dumps(v)}"
                                              for k, v in r.items()) + "\n  }"
                     if isinstance(r, dict) else json.dumps(r) for r in records]
            text = "[\n  " + ",\n  ".join(parts) + "\n]"
        else:
            text = json.dumps(records)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        out[name] = (path, n)
    return out


@pytest.mark.parametrize("name", ["pretty", "compact"])
def test_a_large_array_read_by_several_tasks_gives_one_tasks_rows(big_arrays, name):
    path, n = big_arrays[name]
    files = [InputFile(path, os.path.getsize(path))]
    plan = plan_reads(files, -(-files[0].size // 5))
    assert len(plan) >= 4 and files[0].size >= (40 << 20 if name == "pretty" else 20 << 20)
    whole, split = (iter_rows(p, path) for p in (plan_reads(files, 0), plan))
    count, bad = 0, n * 9 // 10
    for a, b in zip(whole, split, strict=True):
        assert a == b
        if b[2] == b"42":
            line = 1 if name == "compact" else 2 + bad * 5  # 3 keys and 2 braces a record
            assert (b[0], b[1]) == (line, bad)
        count += 1
    assert count == n


def iter_rows(plan: list[ReadRange], path: str):
    """``(line, element, text)`` of every record of one file's plan, streamed, true lines."""
    return ((line, element, text) for _, line, element, text in plan_records(plan))


def write_parquet(path, rows: list[dict], row_group_size: int, schema=None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path,
                   row_group_size=row_group_size)
    return str(path)


def test_parquet_rows_are_json_objects_and_split_by_row_groups(tmp_path):
    rows = [{"instruction": f"q{i}", "input": None if i % 2 else "ctx", "output": f"a{i}",
             "n": i} for i in range(23)]
    path = write_parquet(tmp_path / "t.parquet", rows, row_group_size=5)
    files = [InputFile(path, os.path.getsize(path))]
    whole = read_task_rows(plan_reads(files, 0), [path])
    assert [json.loads(t) for *_, t in whole] == [
        {k: v for k, v in r.items() if v is not None} for r in rows]
    assert [w[:2] for w in whole] == [(path, i) for i in range(23)]  # 0-based rows
    plan = plan_reads(files, 1)
    assert [(r.start, r.end) for r in plan] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert read_task_rows(plan, [path], block_records=2) == whole
    data = sum(r.size for r in plan)  # compressed row groups, the footer aside
    assert [(r.start, r.end) for r in plan_reads(files, data // 2)] == [(0, 3), (3, 5)]


def test_parquet_messages_drop_the_null_fields_structs_are_padded_with(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "",
                           "tool_calls": [{"type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}]}],
             "tools": '[{"type": "function"}]'},
            {"messages": [{"role": "user", "content": "2+2"},
                          {"role": "assistant", "content": "4"}], "tools": None}]
    path = write_parquet(tmp_path / "m.parquet", rows, row_group_size=10)
    got = [json.loads(t) for *_, t in read_task_rows(plan_reads([InputFile(path, 1)], 0), [path])]
    assert got == [rows[0], {"messages": rows[1]["messages"]}]
