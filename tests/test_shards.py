"""``--shards N``: contiguous input ranges, the unsharded bytes when concatenated (packing none),
and a manifest that names the shards and the --data-path that trains on all of them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fixtures import alpaca_samples, write_jsonl
from sftprep import outputs, report, trainer
from sftprep.idxmap import IndexedReader, check_sft_layout
from sftprep.shards import data_path_argument, shard_of_tasks, task_ranges, task_reach
from sftprep.writer import FIGURES
from test_jobs import ENV
from test_pipeline import build, read

SIZES = [9, 3, 14, 6, 11]  # lines per file: blocks and batches span files


def test_tasks_go_to_contiguous_shards_balanced_by_bytes():
    assert shard_of_tasks([100] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert shard_of_tasks([700, 100, 100, 100], 2) == [0, 1, 1, 1]
    assert shard_of_tasks([10, 10], 4) == [1, 3]  # fewer tasks than shards: two stay empty
    assert task_ranges([1, 3], 4) == [(0, -1), (0, 0), (0, -1), (1, 1)]
    for n in (1, 2, 3, 5):
        shards = shard_of_tasks([3, 1, 4, 1, 5, 9, 2, 6], n)
        assert shards == sorted(shards) and shards[-1] < n
    assert data_path_argument([{"prefix": "o/p_0_text_document", "documents": 7},
                               {"prefix": "o/p_1_text_document", "documents": 0},
                               {"prefix": "o/p_2_text_document", "documents": 5}]) == \
        "7 o/p_0_text_document 5 o/p_2_text_document"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-data")
    samples = alpaca_samples(sum(SIZES), seed=11)
    out, at = [], 0
    for k, n in enumerate(SIZES):
        out.append(write_jsonl(root / f"part{k}.jsonl", samples[at:at + n]))
        at += n
    return out


OPTIONS = dict(packing__mode="none", run__workers=2, run__batch_size=16)


@pytest.fixture(scope="module")
def four_shards(ray_session, qwen_dir, files, tmp_path_factory):
    """The unsharded build (``whole``) and a four-shard build (``sh``) of ``files``: the
    directory and both manifests."""
    root = tmp_path_factory.mktemp("four")
    whole = build(files, qwen_dir, root / "whole", **OPTIONS)
    sharded = build(files, qwen_dir, root / "sh", output__shards=4, **OPTIONS)
    return root, whole, sharded


def test_four_shards_concatenate_to_the_unsharded_output(four_shards, files):
    tmp_path, whole, sharded = four_shards
    prefixes = [str(tmp_path / f"sh_{k}_text_document") for k in range(4)]
    assert [s["prefix"] for s in sharded["shards"]] == prefixes
    bins = [open(p + ".bin", "rb").read() for p in prefixes]
    assert b"".join(bins) == read(tmp_path / "whole")[0]
    docs = [check_sft_layout(IndexedReader(p))["documents"] for p in prefixes]
    assert [s["documents"] for s in sharded["shards"]] == docs
    assert all(docs) and sum(docs) == whole["summary"]["documents"] == sum(SIZES)
    # contiguous input ranges by bytes: each shard holds the lines of its files, in order
    owner = shard_of_tasks([os.path.getsize(f) for f in files], 4)
    assert docs == [sum(n for n, k in zip(SIZES, owner) if k == shard) for shard in range(4)]
    lengths = np.concatenate([IndexedReader(p).index.sequence_lengths for p in prefixes])
    assert np.array_equal(lengths, IndexedReader(str(tmp_path / "whole_text_document"))
                          .index.sequence_lengths)
    assert sharded["data_path"] == " ".join(f"{d} {p}" for d, p in zip(docs, prefixes))
    for key in ("records", "samples_written", "documents", "tokens", "trained_tokens",
                *FIGURES):
        assert sharded["summary"][key] == whole["summary"][key]
    for key in ("packed_documents", "max_samples_per_document", "rows_breaking",
                "first_document_breaking", "safe_modes"):  # the rows are the same rows
        assert sharded["trainer"][key] == whole["trainer"][key]
    assert sharded["trainer"]["train_with"]["DATASET_PATH"] == sharded["data_path"]
    on_disk = json.loads(open(tmp_path / "sh_text_document.manifest.json").read())
    assert on_disk["shards"] == sharded["shards"] and on_disk["data_path"] == sharded["data_path"]
    text = report.summary_text(sharded)
    assert f"--data-path         {sharded['data_path']}" in text
    assert text.count("(.bin/.idx, verified)") == 4
    assert not (tmp_path / "sh_text_document.bin").exists()


def test_a_rebuild_with_fewer_shards_leaves_no_shard_of_the_old_one(four_shards, qwen_dir,
                                                                    files, tmp_path):
    """Rebuilding a prefix with fewer shards, or unsharded, removes the old build's other
    shards: nothing beside the new output looks like a part of it."""
    def shards_on_disk() -> set[str]:
        return {p.name.split("_text_document")[0] for p in tmp_path.glob("sh_*_text_document*")}

    root = four_shards[0]  # the four-shard build, moved here as if made here: the old build
    for old in root.glob("sh_*"):
        shutil.copy(old, tmp_path)
    manifest = tmp_path / "sh_text_document.manifest.json"
    manifest.write_text(manifest.read_text().replace(str(root), str(tmp_path)))
    assert shards_on_disk() == {"sh_0", "sh_1", "sh_2", "sh_3"}
    options = dict(OPTIONS, output__overwrite=True)
    build(files, qwen_dir, tmp_path / "sh", output__shards=2, **options)
    assert shards_on_disk() == {"sh_0", "sh_1"}
    whole = build(files, qwen_dir, tmp_path / "sh", **options)
    assert shards_on_disk() == set()
    assert whole["summary"]["documents"] == sum(SIZES)
    assert (tmp_path / "sh_text_document.bin").exists()


def test_shards_no_manifest_names_are_an_incomplete_build_the_next_build_removes(
        ray_session, qwen_dir, files, tmp_path, monkeypatch, caplog):
    """The manifest is the commit point of a shard set: a build stopped after publishing its
    shards and before its manifest leaves no output, as ``verify`` and the next build see."""
    options = OPTIONS

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the build stops between its shards and its manifest

    with monkeypatch.context() as m:
        m.setattr(outputs, "write_manifest", stopped)
        with pytest.raises(KeyboardInterrupt):
            build(files, qwen_dir, tmp_path / "sh", output__shards=3, **options)
    assert sorted(p.name for p in tmp_path.glob("sh_*.idx")) == [
        f"sh_{k}_text_document.idx" for k in range(3)]
    for given in ("sh", "sh_1_text_document", "sh_0_text_document.bin"):
        verify = subprocess.run([sys.executable, "-m", "sftprep", "verify", given],
                                cwd=tmp_path, capture_output=True, text=True, env=ENV)
        assert verify.returncode == 2 and len(verify.stderr.splitlines()) == 1, verify.stderr
        assert verify.stderr.startswith(f"error: {given}: an incomplete build: sh_0_text_document"
                                        ", sh_1_text_document, sh_2_text_document with no "
                                        "manifest naming them"), verify.stderr
    with caplog.at_level(logging.WARNING, logger="sftprep.outputs"):
        build(files, qwen_dir, tmp_path / "sh", output__shards=2, **options)  # no --overwrite
    assert [r.getMessage() for r in caplog.records if "no manifest" in r.getMessage()] == [
        "[sftprep] removed 3 shards that no manifest names (a build stopped before it "
        "finished): " + ", ".join(str(tmp_path / f"sh_{k}_text_document") for k in range(3))]
    assert sorted(p.name for p in tmp_path.glob("sh_*.idx")) == [
        "sh_0_text_document.idx", "sh_1_text_document.idx"]


def test_a_shard_starting_inside_a_split_file_names_true_lines(tmp_path):
    """Read tasks 0 and 1 split one file; the shard owning task 1 still reports a bad record by
    its line in the file, from task 0's end row (the only row of task 0 it keeps)."""
    from sftprep.writer import SFTWriter
    from test_writer import PAD, S, end, sample, table, tasks

    assert task_reach([0, 0, 0, 1, 1], [(0, 1), (2, 3), (4, 4), (0, -1)]) == \
        [(0, 1), (0, 3), (3, 4), (0, -1)]
    rows = []
    for task, lines in ((0, 3), (1, 2)):
        for line in range(1, lines + 1):
            ids, trained = sample(8, line)
            rows.append({"task": task, "file": 0, "line": line, "input_ids": ids,
                         "trained": trained})
        rows.append(end(task, lines))
    rows[5] = {"task": 1, "file": 0, "line": 2, "status": "rejected", "reason": "bad json",
               "detail": "x", "text": "{"}
    w = SFTWriter(str(tmp_path / "s_1_text_document"), ["data.jsonl"], S, PAD,
                  on_error="skip", plan=tasks(0, 0), owns=(1, 1))
    w.consume(table(rows))
    summary = w.finish({})["summary"]
    assert summary["samples_written"] == 1 and summary["rejected_records"] == 1
    reject = json.loads(open(tmp_path / "s_1_text_document.rejects.jsonl").readline())
    assert reject["line"] == 3 + 2


def test_trainer_figures_of_shards_number_documents_across_them():
    first = trainer.figures() | {"documents": 5, "full_rows": 1, "max_samples_per_document": 1,
                                 "first": {"full_rows": 3}}
    second = trainer.figures() | {"documents": 4, "full_rows": 2, "packed_documents": 4,
                                  "max_samples_per_document": 6,
                                  "first": {"full_rows": 0, "packed_documents": 1}}
    t = trainer.combine([first, second])
    assert (t["documents"], t["full_rows"], t["packed_documents"]) == (9, 3, 4)
    assert t["max_samples_per_document"] == 6
    assert t["first"] == {"full_rows": 3, "packed_documents": 6}
