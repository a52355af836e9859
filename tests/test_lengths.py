"""The stats job: the reference's describe() numbers, and projections equal to what builds reach."""

from __future__ import annotations

import itertools
import json
import os

import pandas as pd

from fixtures import (alpaca_samples, lines_with_groups, needs_shared, record_batch,
                      shared_file, write_jsonl)
from sftprep import lengths, pipeline
from sftprep.config import BuildConfig, load
from sftprep.encode import prepare
from sftprep.template import load_tokenizer
from sftprep.tokenize import OK, REJECTED, TokenizeSpec

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                  {"type": "text", "text": "there"}]},
                     {"role": "assistant", "content": "Hello!"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
BAD = [b'{"instruction": "cut short", "output": "x\n', b'{"instruction": "no output"}\n',
       b"[]\n", b"42\n"]


def run_stats(inputs, tmp_path, **options):
    overrides = {"source.inputs": [str(p) for p in inputs], "output.dir": str(tmp_path / "stats"),
                 "run.progress": False, "run.workers": 2}
    overrides.update({k.replace("__", "."): v for k, v in options.items()})
    return lengths.run(load(lengths.StatsConfig, None, overrides))


def alpaca_chars(sample: dict) -> int:
    return len(sample["instruction"] + sample["input"] + sample["output"])


def write_mixed(tmp_path) -> tuple[str, list[int]]:
    """Alpaca lines (some pre-packed lists), two chats and bad lines; the expected characters."""
    lines = lines_with_groups(alpaca_samples(40, seed=5))
    path = tmp_path / "mixed.jsonl"
    expected = []
    with open(path, "wb") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
            expected += [alpaca_chars(s) for s in (line if isinstance(line, list) else [line])]
            if i == 3:
                f.write(json.dumps(CHAT).encode() + b"\n" + json.dumps(SHAREGPT).encode() + b"\n")
                expected += [len("Be brief.Hi thereHello!"), len("2+2?4")]
            if i in (5, 6, 7, 8):
                f.write(BAD[i - 5])
    return str(path), expected


def test_char_stage_counts_every_sample_and_rejects_bad_lines():
    raw = [json.dumps(CHAT).encode(), json.dumps([SHAREGPT, SHAREGPT]).encode(), b"42"]
    batch = record_batch(raw)
    out = lengths.char_lengths(batch).to_pylist()
    assert [(r["line"], r["sample"], r["status"], r["chars"]) for r in out] == [
        (1, 0, OK, 23), (2, 0, OK, 5), (2, 1, OK, 5), (3, -1, REJECTED, None)]
    assert out[3]["reason"] == "not a sample"


def test_describe_equals_pandas_and_bad_records_are_listed(ray_session, tmp_path):
    path, expected = write_mixed(tmp_path)
    result = run_stats([path], tmp_path, source__split_bytes=2000)  # lines true across tasks
    want = pd.Series(expected).describe()
    assert result["chars"] == {k: float(v) for k, v in want.items()}
    assert lengths.describe_text(result["chars"]) == str(want.astype("float64"))
    bad = result["bad_records"]
    assert bad["count"] == 4 and bad["by_reason"] == {
        "empty group": 1, "missing field": 1, "not a sample": 1, "truncated JSON": 1}
    assert [(e["file"], e["line"], e["reason"]) for e in bad["examples"]][:2] == [
        (path, 9, "truncated JSON"), (path, 11, "missing field")]
    with open(tmp_path / "stats" / lengths.BAD_RECORDS, encoding="utf-8") as f:
        assert len(f.readlines()) == 4
    with open(tmp_path / "stats" / lengths.STATS_JSON, encoding="utf-8") as f:
        assert json.load(f)["chars"]["count"] == len(expected)


def test_projection_equals_what_the_build_reaches(ray_session, qwen_dir, tmp_path):
    S = 256
    samples = alpaca_samples(60, seed=7)
    # A prompt of ~300 tokens: dropped at S=256, kept (cut) at 512, alone and in a list line.
    huge = {"instruction": "Repeat after me: " + "lorem ipsum " * 140, "input": "", "output": "ok"}
    lines = lines_with_groups(samples)
    lines[4:4] = [huge, [samples[0], huge, samples[1]]]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    result = run_stats([path], tmp_path, template__tokenizer=qwen_dir, template__seq_length=S,
                       packing__window=16, output__ladder=[512], run__workers=1)
    at = result["at_seq_length"]
    assert at["dropped"] == 2 and at["truncated"] > 0
    assert [r["seq_length"] for r in result["ladder"]] == [S, 512]
    assert result["ladder"][1]["dropped"] == 0
    for mode in ("none", "sequential", "bfd"):
        config = load(BuildConfig, None, {
            "source.inputs": [path], "template.tokenizer": qwen_dir, "template.seq_length": S,
            "packing.mode": mode, "packing.window": 16, "run.progress": False,
            "run.workers": 1, "output.prefix": str(tmp_path / mode)})
        built = pipeline.build(config)["summary"]
        projected = result["packing"][mode]
        assert (projected["docs"], projected["efficiency"], projected["tokens"]) == (
            built["documents"], built["packing_efficiency"], built["tokens"]), mode
        assert (at["dropped"], at["truncated"]) == (built["dropped_samples"],
                                                    built["truncated_samples"])
    assert result["packing"] == result["ladder"][0]["packing"]
    saved = json.loads((tmp_path / "stats" / lengths.STATS_JSON).read_text(encoding="utf-8"))
    assert all(set(saved["packing"][m]) >= {"docs", "efficiency"} for m in ("none", "sequential",
                                                                          "bfd"))
    assert {"chars", "tokens", "ladder", "recommended_seq_length"} <= set(saved)
    assert saved["recommended_seq_length"] in (S, 512, None)
    with open(tmp_path / "stats" / lengths.HISTOGRAM, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "recommended S" in lengths.summary_text(result)


def test_stage_lengths_and_the_drop_rule_at_other_lengths(qwen_dir):
    """Without Ray: the stage sends lengths only, and what the ladder assumes at another S
    (kept iff a trained token lies inside it) is what the stage itself decides there."""
    samples = alpaca_samples(12, seed=9)
    samples[3] = {"instruction": "Say: " + "lorem ipsum " * 140, "input": "", "output": "ok"}
    raw = [json.dumps(x, ensure_ascii=False).encode() for x in (samples[:6], *samples[6:])]
    raw.append(b"[]")
    batch = record_batch(raw, end=True)
    measured = {}
    setup = prepare(load_tokenizer(qwen_dir))
    for S, overlong in itertools.product((64, 256, 512), ("truncate", "drop")):
        spec = TokenizeSpec.of(tokenizer=qwen_dir, seq_length=S, overlong=overlong)
        table = lengths.TokenLengths(spec, setup)(batch)
        assert table.schema == lengths.SCHEMA
        collector = lengths.Collector(["x.jsonl"], "skip", None)
        collector.add(table)
        measured[S, overlong] = collector.finish()
        assert collector.records == len(raw) and collector.bad_count == 1
    assert list(measured[256, "truncate"].chars) == [alpaca_chars(x) for x in samples]
    for other, overlong in itertools.product((64, 512), ("truncate", "drop")):
        assert list(measured[256, overlong].kept_at(other, 256, True, overlong)) == list(
            measured[other, overlong].ok), (other, overlong)
    assert not measured[256, "truncate"].ok[3] and measured[512, "truncate"].ok[3]
    assert measured[64, "drop"].ok.sum() < measured[64, "truncate"].ok.sum()


@needs_shared("alpaca_en_demo.json", "alpaca_zh_demo.json")
def test_reference_numbers_on_the_shared_alpaca_demo(ray_session, tmp_path):
    for name, count, mean, top in (("alpaca_en_demo.json", 999, 787.41, 2921),
                                   ("alpaca_zh_demo.json", 1000, 217.13, 1229)):
        chars = run_stats([shared_file(name)], tmp_path)["chars"]
        assert (chars["count"], round(chars["mean"], 2), chars["max"]) == (count, mean, top)


def test_help_comes_from_the_config_metadata():
    from sftprep import cli
    text = cli.parser_for(lengths.StatsConfig, "stats").format_help()
    assert "--output-dir" in text and "only character lengths" in text
    config = cli.parse(lengths.StatsConfig, "stats", ["--input", "x.jsonl", "--seq-length", "4096"])
    assert config.template.tokenizer is None and config.template.seq_length == 4096
    assert config.source.on_error == "skip" and config.output.ladder == lengths.LADDER


def test_without_matplotlib_only_the_plot_is_skipped(ray_session, qwen_dir, tmp_path,
                                                     monkeypatch):
    """matplotlib comes with the ``stats`` extra only: without it the JSON and the table are
    written and the summary says why there is no plot."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    path = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(8, seed=3))
    result = run_stats([path], tmp_path, template__tokenizer=qwen_dir, run__workers=1)
    assert sorted(os.listdir(tmp_path / "stats")) == [lengths.STATS_JSON]
    saved = json.loads((tmp_path / "stats" / lengths.STATS_JSON).read_text(encoding="utf-8"))
    assert saved["packing"]["bfd"]["docs"] >= 1 and saved["notes"] == result["notes"]
    text = lengths.summary_text(result)
    assert "bfd docs" in text
    assert text.splitlines()[-1] == (f"note: {lengths.HISTOGRAM} not drawn: the plot needs "
                                     "matplotlib (pip install 'sftprep[stats]'); everything "
                                     f"else is in {lengths.STATS_JSON}")
