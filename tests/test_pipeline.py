"""End to end on a real local Ray runtime: bytes against the contract, determinism, bad input."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from fixtures import alpaca_samples, lines_with_groups, write_jsonl
from contract import build_bytes
from sftprep import pipeline
from sftprep.config import BuildConfig, ConfigError, load
from sftprep.idxmap import IndexedReader
from sftprep.tokenize import PHASES
from sftprep.writer import WRITER_PHASES, BadRecordError

S = 256
REFERENCE_CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "qwen2-reference.yaml")


def build(inputs, tokenizer, prefix, config=None, **options):
    overrides = {"source.inputs": list(inputs), "template.tokenizer": tokenizer,
                 "template.seq_length": S, "output.prefix": str(prefix), "run.progress": False}
    overrides.update({k.replace("__", "."): v for k, v in options.items()})
    return pipeline.build(load(BuildConfig, config, overrides))


def read(prefix) -> tuple[bytes, bytes]:
    with open(f"{prefix}_text_document.bin", "rb") as b, open(f"{prefix}_text_document.idx", "rb") as i:
        return b.read(), i.read()


@pytest.fixture(scope="module")
def reference_lines():
    samples = alpaca_samples(48, seed=1)
    # One prompt longer than S: the reference drops it, in a dict line and inside a list line.
    huge = {"instruction": "Repeat after me: " + "lorem ipsum " * 200, "input": "", "output": "ok"}
    lines = lines_with_groups(samples)
    lines.insert(3, huge)
    lines.insert(9, [samples[0], huge, samples[1]])
    return lines


@pytest.mark.parametrize("packing", ["none", "sequential"])
def test_reference_settings_give_the_reference_bytes(ray_session, qwen, qwen_dir, tmp_path,
                                                     reference_lines, packing):
    path = write_jsonl(tmp_path / "train.jsonl", reference_lines)
    manifest = build([path], qwen_dir, tmp_path / "out", config=REFERENCE_CONF,
                     packing__mode=packing, run__workers=2, run__batch_size=8)
    expected = build_bytes(qwen, reference_lines, S, qwen.pad_token_id,
                           sequence_packing=packing == "sequential")
    got = read(tmp_path / "out")
    assert got[1] == expected[1]
    assert got[0] == expected[0]
    s = manifest["summary"]
    assert s["dropped_samples"] == 2 and s["dropped_by_reason"] == {"prompt too long": 2}
    assert s["truncated_samples"] > 0 and s["rejected_records"] == 0
    assert manifest["tokenizer"]["pad_id"] == 151669  # <|extra_0|> added after the vocabulary
    timing = manifest["timing"]  # the budget: the driver's steps, the stages' CPU per phase
    assert list(timing["wall_seconds"]) == ["inputs", "ray_start", "tokenizer", "plan",
                                            "writers", "first_block", "stream"]
    assert sum(timing["wall_seconds"].values()) <= manifest["elapsed_seconds"] + 0.01
    assert list(timing["cpu_seconds"]) == ["tokenize", "writer"]
    cpu = timing["cpu_seconds"]
    assert list(cpu["tokenize"]) == list(PHASES) and cpu["tokenize"]["encode"] > 0
    assert list(cpu["writer"]) == list(WRITER_PHASES) and min(cpu["writer"].values()) >= 0


def test_output_is_identical_for_any_worker_count_and_block_size(ray_session, qwen_dir, tmp_path):
    samples = alpaca_samples(90, seed=2)
    lines = lines_with_groups(samples)
    a = write_jsonl(tmp_path / "a.jsonl", lines[:30])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines[30:50])
    with open(tmp_path / "c.json", "w", encoding="utf-8") as f:
        json.dump(lines[50:], f, ensure_ascii=False, indent=1)
    outputs = []
    for workers, block, batch in ((1, 1000, 256), (3, 7, 5)):
        prefix = tmp_path / f"w{workers}"
        build([a, str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.json")], qwen_dir, prefix,
              packing__mode="bfd", packing__window=16, run__workers=workers,
              run__block_records=block, run__batch_size=batch)
        outputs.append(read(prefix))
    assert outputs[0] == outputs[1]
    assert IndexedReader(str(tmp_path / "w1_text_document")).index.sequence_lengths.size > 0


def _bad_file(tmp_path) -> str:
    good = alpaca_samples(6, seed=3)
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for line in (good[0], good[1]):
            f.write(json.dumps(line).encode() + b"\n")
        f.write(b'{"instruction": "cut short", "output": "x\n')     # line 3: truncated
        f.write(b"\n")                                              # line 4: blank, ignored
        f.write(json.dumps(good[2]).encode() + b"\n")               # line 5
        f.write(b'{"instruction": "caf\xe9", "output": "x"}\n')     # line 6: not UTF-8
        f.write(b'{"instruction": "no output"}\n')                  # line 7: missing field
        f.write(b"[]\n")                                            # line 8: empty group
        f.write(b'{"instruction": 3, "output": "x"}\n')             # line 9: not a string
        f.write(b"42\n")                                            # line 10: not a sample
        f.write(json.dumps(good[3]).encode() + b"\n")               # line 11
    return str(path)


def test_on_error_fail_names_the_first_bad_line_and_leaves_no_output(ray_session, qwen_dir,
                                                                    tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:3: truncated JSON"):
        build([path], qwen_dir, tmp_path / "out", run__workers=1)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


def test_on_error_skip_writes_the_good_and_reports_the_bad(ray_session, qwen_dir, tmp_path):
    path = _bad_file(tmp_path)
    manifest = build([path], qwen_dir, tmp_path / "out", source__on_error="skip", run__workers=1)
    s = manifest["summary"]
    assert s["records"] == 10 and s["samples_written"] == 4 and s["rejected_records"] == 6
    assert s["rejected_by_reason"] == {"empty group": 1, "missing field": 1, "not UTF-8": 1,
                                       "not a sample": 1, "not a string": 1, "truncated JSON": 1}
    with open(tmp_path / "out_text_document.rejects.jsonl", encoding="utf-8") as f:
        reported = [json.loads(line) for line in f]
    rejects = [r for r in reported if r["status"] != "cut"]  # cut: written shorter
    assert len(reported) - len(rejects) == s["cut_samples"]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (3, "truncated JSON"), (6, "not UTF-8"), (7, "missing field"), (8, "empty group"),
        (9, "not a string"), (10, "not a sample")]
    assert all(r["file"] == path and r["text"] for r in rejects)


def test_existing_output_is_refused_without_overwrite(ray_session, qwen_dir, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", alpaca_samples(5))
    build([path], qwen_dir, tmp_path / "out", run__workers=1)
    before = read(tmp_path / "out")
    with pytest.raises(ConfigError, match="--overwrite"):
        build([path], qwen_dir, tmp_path / "out", run__workers=1)
    build([path], qwen_dir, tmp_path / "out", run__workers=1, output__overwrite=True,
          packing__mode="sequential")
    assert read(tmp_path / "out") != before


def test_a_process_loads_a_tokenizer_once_for_the_same_files_and_settings(qwen_dir, tmp_path):
    """A notebook's next build reuses the prepared tokenizer; other files, pad token or backend
    load anew, and only the last few are kept."""
    import shutil

    def config(tokenizer, **kw):
        return load(BuildConfig, None, {"template.tokenizer": tokenizer, "source.inputs": ["x"],
                                        "output.prefix": "o", **kw})

    first = pipeline.loaded_tokenizer(config(qwen_dir))
    again = pipeline.loaded_tokenizer(config(qwen_dir))
    assert again[0] is first[0]
    other_pad = pipeline.loaded_tokenizer(config(qwen_dir,
                                                 **{"template.pad_token": "<|extra_0|>"}))
    assert other_pad[0] is not first[0] and other_pad[0].pad_token == "<|extra_0|>"
    changed = tmp_path / "tok"
    shutil.copytree(qwen_dir, changed)
    config_file = changed / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace(
        '"model_max_length"', '"x": 1, "model_max_length"', 1))  # other files: loaded anew
    assert pipeline.loaded_tokenizer(config(str(changed)))[0] is not first[0]
    assert len(pipeline._LOADED) == pipeline.LOADED_KEEP


def test_a_prepared_tokenizer_is_kept_on_disk_for_the_next_process(qwen_dir, tmp_path,
                                                                   monkeypatch):
    """The next build's driver reads the prepared tokenizer back instead of loading it with
    transformers; the same files elsewhere share it; other settings, a changed file or an
    unreadable entry prepare anew; only the newest few are kept."""
    import dataclasses
    import shutil

    import numpy as np

    from sftprep import tokenizer_files

    def same(a, b) -> bool:
        fast = [{k: v for k, v in x.fast.items() if k != "lengths"} for x in (a, b)]
        return (dataclasses.replace(a, fast=None) == dataclasses.replace(b, fast=None)
                and fast[0] == fast[1] and np.array_equal(a.fast["lengths"], b.fast["lengths"]))

    monkeypatch.setenv("SFTPREP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "_LOADED", {})
    loads = []
    real_load = pipeline.load_tokenizer
    monkeypatch.setattr(pipeline, "load_tokenizer",
                        lambda *a: loads.append(a) or real_load(*a))

    def config(tokenizer, **kw):
        return load(BuildConfig, None, {"template.tokenizer": tokenizer, "source.inputs": ["x"],
                                        "output.prefix": "o", **kw})

    made, _ = pipeline.loaded_tokenizer(config(qwen_dir))
    pipeline._LOADED.clear()                      # a new process, as far as the cache goes
    moved = tmp_path / "elsewhere"
    shutil.copytree(qwen_dir, moved)
    kept, _ = pipeline.loaded_tokenizer(config(str(moved)))
    assert len(loads) == 1 and kept is not made
    assert same(kept, made)
    tok = real_load(qwen_dir)
    assert (kept.pad_token, kept.pad_id, kept.vocab_size, kept.backend) == (
        tok.pad_token, tok.pad_token_id, len(tok), "fast")

    folder = tokenizer_files.cache_dir("prepared")
    for name in os.listdir(folder):               # cut short, as by a full disk
        with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(100)
    pipeline._LOADED.clear()
    again, _ = pipeline.loaded_tokenizer(config(qwen_dir))
    assert len(loads) == 2 and same(again, made)

    monkeypatch.setattr(tokenizer_files, "PREPARED_KEEP", 2)
    pipeline._LOADED.clear()
    pipeline.loaded_tokenizer(config(qwen_dir, **{"template.backend": "hf"}))
    assert len(loads) == 3
    (moved / "tokenizer_config.json").write_text(
        (moved / "tokenizer_config.json").read_text().replace(
            '"model_max_length"', '"x": 1, "model_max_length"', 1))
    pipeline.loaded_tokenizer(config(str(moved)))
    assert len(loads) == 4
    assert len(os.listdir(folder)) == 2 and not any(n.startswith(".") for n in os.listdir(folder))
