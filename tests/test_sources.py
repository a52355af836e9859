"""Reading: line numbers, JSON arrays split while streaming, gz, globs and directories."""

from __future__ import annotations

import gzip
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftprep.sources import InputError, expand_inputs, iter_records, read_records

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(json_values, max_size=12), indent=st.sampled_from([None, 1, 2]),
       chunk=st.integers(1, 64))
def test_array_elements_are_split_exactly(values, indent, chunk):
    text = json.dumps(values, indent=indent, ensure_ascii=False).encode()
    records = list(iter_records(io.BytesIO(text), is_array_file=True, chunk_size=chunk))
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
    for _, raw in iter_records(io.BytesIO(text), is_array_file=True, chunk_size=chunk):
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
    got = list(iter_records(io.BytesIO(text), is_array_file=False, chunk_size=chunk))
    expected = [(i + 1, l.rstrip("\r").encode()) for i, l in enumerate(lines) if l.strip()]
    assert got == expected


def test_json_file_that_is_really_jsonl_is_read_as_lines():
    text = b'{"a": 1}\n{"a": 2}\n'
    assert list(iter_records(io.BytesIO(text), is_array_file=True)) == [(1, b'{"a": 1}'),
                                                                       (2, b'{"a": 2}')]


def test_expand_inputs_files_dirs_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.jsonl", "d/sub/b.json", "d/c.txt", "e.jsonl"):
        (tmp_path / name).write_text("{}\n")
    with gzip.open(tmp_path / "d" / "z.jsonl.gz", "wt") as f:
        f.write('{"x": 1}\n')
    got = [f.url for f in expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.jsonl"),
                                         str(tmp_path / "d" / "*"), str(tmp_path / "e.jsonl")])]
    assert got == sorted(str(tmp_path / n) for n in ("d/a.jsonl", "d/sub/b.json",
                                                     "d/z.jsonl.gz", "e.jsonl"))
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="matched no"):
        expand_inputs([str(tmp_path / "nothing*.jsonl")])


def test_read_records_blocks_and_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(f'{{"i": {i}}}\n' for i in range(10))
    blocks = list(read_records(str(path), None, 3, block_records=4))
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    rows = [r for b in blocks for r in b.to_pylist()]
    assert rows[0] == {"file": 3, "line": 1, "text": b'{"i": 0}'}
    assert [r["line"] for r in rows] == list(range(1, 11))
