"""Inputs as users have them give the bytes of the same records in plain JSONL: compact and BOM
JSON arrays, BOM and CRLF JSONL, Parquet (Alpaca, messages and ShareGPT columns, renamed
columns), and large files split across read tasks, with true lines in every error."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures import alpaca_samples, lines_with_groups, write_jsonl
from sftprep.packing import MODES
from sftprep.pipeline import tokenize_spec
from sftprep.config import BuildConfig, load
from sftprep.sources import InputFile, plan_reads, read_range
from sftprep.tokenize import Tokenize
from sftprep.writer import BadRecordError, SFTWriter
from test_pipeline import S, build, read

TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}])


def chats(n: int) -> list[dict]:
    """OpenAI messages records, some with a system turn, tools and a tool call."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": f"{2 * i}."}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        record = {"messages": messages}
        if i % 4 == 1:
            record["tools"] = TOOLS
            record["messages"] = [
                {"role": "user", "content": f"Weather in city {i}?"},
                {"role": "assistant", "content": "", "tool_calls": [{
                    "type": "function", "function": {
                        "name": "get_weather", "arguments": json.dumps({"city": f"c{i}"})}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."}]
        out.append(record)
    return out


def sharegpt(n: int) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"Name colour {i}."},
                               {"from": "gpt", "value": ["red", "blue", "绿色"][i % 3]}],
             **({"system": "Be terse."} if i % 2 else {})} for i in range(n)]


def renamed(samples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Alpaca records under other column names, and the same records as sftprep reads them."""
    return ([{"prompt": s["instruction"], "context": s["input"], "answer": s["output"]}
             for s in samples], samples)


COLUMNS = {"prompt": "instruction", "context": "input", "answer": "output"}


def write_parquet(path, rows: list[dict], row_group_size: int = 7) -> str:
    """Columns and struct fields from all the rows (``from_pylist`` takes the first row's)."""
    table = pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(rows))])
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def test_every_input_shape_gives_the_bytes_of_the_same_records_in_jsonl(ray_session, qwen_dir,
                                                                        tmp_path):
    lines = lines_with_groups(alpaca_samples(40, seed=11))
    alpaca = alpaca_samples(25, seed=12)
    for s in alpaca[::3]:
        s["input"] = None  # a null in the Parquet column: the key is left out of the JSONL
    alpaca_jsonl = [{k: v for k, v in s.items() if v is not None} for s in alpaca]
    parquet_renamed, as_read = renamed(alpaca_samples(12, seed=13))
    parts = {  # file name -> (records, how they are written); read in this (sorted) order
        "a_bom.jsonl": lines[:8], "b_compact.json": lines[8:16],
        "c_bom_array.json": lines[16:24], "d_crlf.jsonl": lines[24:],
        "e_alpaca.parquet": alpaca, "f_messages.parquet": chats(14),
        "g_renamed.parquet": parquet_renamed, "h_sharegpt.parquet": sharegpt(9)}
    data = tmp_path / "data"
    data.mkdir()
    text = lambda records: [json.dumps(x, ensure_ascii=False) for x in records]  # noqa: E731
    (data / "a_bom.jsonl").write_bytes(("\ufeff" + "\n".join(text(parts["a_bom.jsonl"]))
                                        + "\n").encode())
    with open(data / "b_compact.json", "w", encoding="utf-8") as f:
        json.dump(parts["b_compact.json"], f, ensure_ascii=False)  # the whole array on line 1
    (data / "c_bom_array.json").write_bytes(
        ("\ufeff" + json.dumps(parts["c_bom_array.json"], ensure_ascii=False, indent=2)).encode())
    (data / "d_crlf.jsonl").write_bytes("\r\n".join(text(parts["d_crlf.jsonl"])).encode())
    for name in ("e_alpaca.parquet", "f_messages.parquet", "g_renamed.parquet",
                 "h_sharegpt.parquet"):
        write_parquet(data / name, parts[name])
    message = pq.read_schema(data / "f_messages.parquet").field("messages").type.value_type
    assert message.get_field_index("tool_calls") >= 0  # a list<struct> column, nested
    reference = [x for name in sorted(parts) for x in {
        "e_alpaca.parquet": alpaca_jsonl, "g_renamed.parquet": as_read}.get(name, parts[name])]
    plain = write_jsonl(tmp_path / "plain.jsonl", reference)

    options = dict(packing__mode="bfd", packing__window=16, run__workers=2,
                   run__block_records=5, source__columns=COLUMNS)
    want = build([plain], qwen_dir, tmp_path / "want", **options)["summary"]
    got = build([str(data)], qwen_dir, tmp_path / "got", source__split_bytes=1000, **options)
    assert read(tmp_path / "got") == read(tmp_path / "want")
    assert got["summary"]["records"] == want["records"] == len(reference)
    assert want["rejected_records"] == 0
    tasks = {os.path.basename(i["url"]): i["read_tasks"] for i in got["inputs"]}
    # Arrays by elements; Parquet by row groups (h's two are under 1000 bytes together).
    assert tasks == {"a_bom.jsonl": 7, "b_compact.json": 5, "c_bom_array.json": 5,
                     "d_crlf.jsonl": 3, "e_alpaca.parquet": 4, "f_messages.parquet": 2,
                     "g_renamed.parquet": 2, "h_sharegpt.parquet": 1}


def test_bad_parquet_rows_are_named_by_row_through_the_on_error_policy(ray_session, qwen_dir,
                                                                        tmp_path):
    rows = alpaca_samples(10, seed=14)
    rows[7]["output"] = None
    path = write_parquet(tmp_path / "t.parquet", rows, row_group_size=3)
    numbers = write_parquet(tmp_path / "u.parquet", [{"instruction": "x", "output": 5}])
    array = tmp_path / "v.json"  # and a compact array's element, for comparison
    array.write_text(json.dumps(alpaca_samples(3) + [{"instruction": "no output"}]))
    with pytest.raises(BadRecordError, match=r"t\.parquet:row 7: missing field: 'output'"):
        build([path], qwen_dir, tmp_path / "fail", source__split_bytes=1, run__workers=1)
    manifest = build([path, numbers, str(array)], qwen_dir, tmp_path / "skip",
                     source__split_bytes=1, source__on_error="skip", run__workers=1)
    assert manifest["inputs"][0]["read_tasks"] == 4
    with open(tmp_path / "skip_text_document.rejects.jsonl", encoding="utf-8") as f:
        rejects = [r for r in map(json.loads, f) if r["status"] != "cut"]  # cut: written
    assert [{k: r[k] for k in ("file", "row", "line", "element", "reason") if k in r}
            for r in rejects] == [
        {"file": path, "row": 7, "reason": "missing field"},
        {"file": numbers, "row": 0, "reason": "not a string"},
        {"file": str(array), "line": 1, "element": 3, "reason": "missing field"}]
    assert json.loads(rejects[0]["text"]) == {k: v for k, v in rows[7].items() if v is not None}


# -- splitting, without Ray: the stage and the writer fed task by task ---------------------------

@pytest.fixture(scope="module")
def split_input(tmp_path_factory) -> str:
    """JSONL with pre-packed groups, blank lines, CRLF and bad lines spread through it."""
    lines = [json.dumps(x, ensure_ascii=False) for x in
             lines_with_groups(alpaca_samples(70, seed=15))]
    for at, bad in ((5, '{"instruction": "cut'), (20, ""), (33, "42"), (41, "   "),
                    (50, '{"instruction": "no output"}')):
        lines.insert(at, bad)
    path = tmp_path_factory.mktemp("split") / "s.jsonl"
    path.write_bytes(("\r\n".join(lines[:30]) + "\n" + "\n".join(lines[30:])).encode())
    return str(path)


@pytest.fixture(scope="module")
def stage(qwen_dir):
    return Tokenize(tokenize_spec(load(BuildConfig, None, {"template.tokenizer": qwen_dir,
                                                           "template.seq_length": S})))


def write_split(stage, path: str, split: int, out: str, packing: str,
                on_error: str = "skip") -> tuple[bytes, bytes, bytes, int]:
    """(.bin, .idx, .rejects.jsonl, read tasks) of a build over ``split``-byte read tasks."""
    plan = plan_reads([InputFile(path, os.path.getsize(path))], split)
    pad_id = stage.hf.tok.token_to_id(stage.setup.special_tokens_map["pad_token"])
    writer = SFTWriter(out, [path], S, pad_id, packing, 8, on_error,
                       plan=plan)
    try:
        for task, r in enumerate(plan):
            for block in read_range(r, task, None, block_records=4):
                writer.consume(stage(block))
        writer.finish({})
    except BaseException:
        writer.abort()
        raise
    with open(out + ".bin", "rb") as b, open(out + ".idx", "rb") as i, \
            open(out + ".rejects.jsonl", "rb") as r:
        return b.read(), i.read(), r.read(), len(plan)


@pytest.mark.parametrize("packing", MODES)
def test_split_reads_give_the_unsplit_bytes_and_lines(stage, split_input, tmp_path, packing):
    whole = write_split(stage, split_input, 0, str(tmp_path / "whole"), packing)
    split = write_split(stage, split_input, 700, str(tmp_path / "split"), packing)
    assert whole[3] == 1 and split[3] > 10
    assert split[:3] == whole[:3]
    rejects = [json.loads(x) for x in whole[2].splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects if r["status"] != "cut"] == [
        (6, "truncated JSON"), (34, "not a sample"), (51, "missing field")]


def test_split_reads_fail_at_the_true_line(stage, split_input, tmp_path):
    with pytest.raises(BadRecordError, match=r"s\.jsonl:6: truncated JSON"):
        write_split(stage, split_input, 300, str(tmp_path / "o"), "bfd", on_error="fail")


def test_a_split_array_reports_a_bad_element_at_its_true_number(stage, tmp_path):
    records = alpaca_samples(120, seed=16)
    records[97] = {"instruction": "no output"}
    for indent in (None, 2):
        path = str(tmp_path / f"a{indent}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=indent)
        whole = write_split(stage, path, 0, str(tmp_path / f"w{indent}"), "bfd")
        split = write_split(stage, path, 2000, str(tmp_path / f"s{indent}"), "bfd")
        assert whole[3] == 1 and split[3] >= 4 and split[:3] == whole[:3]
        rejects = [json.loads(x) for x in split[2].splitlines()]
        line = 1 if indent is None else 2 + sum(
            json.dumps(r, indent=2).count("\n") + 1 for r in records[:97])
        assert [(r["line"], r["element"], r["reason"]) for r in rejects
                if r["status"] != "cut"] == [(line, 97, "missing field")]


# -- one big file, many read tasks, on Ray -------------------------------------------------------

BIG_BYTES = 210_000_000
BIG_RECORDS = 12_000


def test_a_200_mb_file_is_read_by_many_tasks_with_the_unsplit_bytes_and_true_lines(
        ray_session, qwen_dir, tmp_path):
    """Records short enough to tokenize quickly, each followed by a long blank line (lines the
    readers must count and skip, ~17 KB), so the file is large where the build is cheap; one
    record deep inside is cut short. The default split gives the 2-CPU runtime >= 4 tasks."""
    filler = " " * (BIG_BYTES // BIG_RECORDS)
    bad = BIG_RECORDS * 3 // 4
    lines = []
    for i in range(BIG_RECORDS):
        lines.append('{"instruction": "cut' if i == bad else
                     f'{{"instruction": "Say {i}", "output": "{i} {"ok " * (i % 7)}"}}')
        lines.append(filler)
    path = tmp_path / "big.jsonl"
    path.write_bytes("\n".join(lines).encode())
    assert path.stat().st_size >= 200_000_000

    options = dict(packing__mode="bfd", template__seq_length=64, source__on_error="skip",
                   run__workers=2, run__block_records=1024)
    split = build([str(path)], qwen_dir, tmp_path / "split", **options)
    whole = build([str(path)], qwen_dir, tmp_path / "whole", source__split_bytes=0, **options)
    assert split["inputs"][0]["read_tasks"] >= 4 and whole["inputs"][0]["read_tasks"] == 1
    assert read(tmp_path / "split") == read(tmp_path / "whole")
    rejects = (tmp_path / "split_text_document.rejects.jsonl").read_bytes()
    assert rejects == (tmp_path / "whole_text_document.rejects.jsonl").read_bytes()
    [entry] = [json.loads(x) for x in rejects.splitlines()]
    assert (entry["line"], entry["reason"]) == (2 * bad + 1, "truncated JSON")
    assert split["summary"]["records"] == BIG_RECORDS
    assert split["summary"]["samples_written"] == BIG_RECORDS - 1
