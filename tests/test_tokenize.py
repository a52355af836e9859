"""The tokenizer stage on plain batches (no Ray): the contract's labels, cuts, drops, rejects."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest

from contract import encode_group
from fixtures import alpaca_samples, record_batch
from sftprep.tokenize import PHASES, Tokenize, TokenizeSpec, labels

S = 128


@pytest.fixture(scope="module")
def stage(qwen_dir):
    return Tokenize(TokenizeSpec.of(qwen_dir, S, pad_token="<|extra_0|>", trainer_safe=False))


def with_labels(table: pa.Table) -> list[dict]:
    """The stage's rows, each with the labels the writer makes of them (``tokenize.labels``)."""
    ids = table["input_ids"].combine_chunks()
    flat, at = labels(ids, table["trained"].combine_chunks()), ids.offsets.to_numpy()
    return [dict(r, labels=flat[a:b].tolist())
            for r, a, b in zip(table.to_pylist(), at[:-1], at[1:])]


def batch(values: list) -> pa.Table:
    raw = [v if isinstance(v, bytes) else json.dumps(v, ensure_ascii=False).encode()
           for v in values]
    return record_batch(raw)


def test_alpaca_rows_match_the_contract(stage, qwen):
    samples = alpaca_samples(20, seed=5)
    rows = with_labels(stage(batch(samples)))
    for sample, row in zip(samples, rows):
        [doc] = encode_group(qwen, [sample], S, qwen.pad_token_id)
        n = len(row["input_ids"])
        assert row["status"] == "ok"
        assert row["input_ids"] == doc[:n] and row["labels"] == doc[S:S + n]
        assert row["tokens"] >= n and (row["tokens"] > S) == (row["tokens"] > n)


def test_exact_fit_is_not_a_cut_and_long_prompt_is_dropped(stage, qwen):
    base = {"instruction": "Say", "input": "", "output": ""}
    full = len(qwen.encode(stage.render(
        __import__("sftprep.records", fromlist=["x"]).parse_sample(base)).text,
        add_special_tokens=False))
    fit = dict(base, output=" a" * (S - full))
    [row] = stage(batch([fit])).to_pylist()
    assert row["tokens"] == S == len(row["input_ids"])
    drop = {"instruction": "word " * 300, "input": "", "output": "x"}
    [row] = stage(batch([drop])).to_pylist()
    assert row["status"] == "dropped" and row["reason"] == "prompt too long"
    assert row["prompt_tokens"] >= S and row["input_ids"] == []


def test_rows_come_out_in_input_order_with_rejects_in_place(stage):
    good = alpaca_samples(3)
    rows = stage(batch([good[0], b"{broken", [good[1], good[2]], {"x": 1}])).to_pylist()
    assert [(r["line"], r["sample"], r["status"]) for r in rows] == [
        (1, 0, "ok"), (2, -1, "rejected"), (3, 0, "ok"), (3, 1, "ok"), (4, -1, "rejected")]
    assert rows[1]["text"] == "{broken" and rows[4]["reason"] == "unknown format"


def test_multi_turn_labels_cover_exactly_the_assistant_turns(stage, qwen):
    chat = {"messages": [{"role": "user", "content": "Name a colour."},
                         {"role": "assistant", "content": "Blue."},
                         {"role": "user", "content": "另一个？"},
                         {"role": "assistant", "content": "红色。"}]}
    [row] = with_labels(stage(batch([chat])))
    ids = np.array(row["input_ids"])
    ids[-1] = -1 - ids[-1]
    labels = np.array(row["labels"])
    trained = np.zeros(len(ids), bool)
    trained[1:] = labels[:-1] != -100
    assert np.array_equal(labels[:-1][trained[1:]], ids[1:][trained[1:]])
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(trained.astype(int))) + 1)
    texts = [qwen.decode(ids[r].tolist()) for r in runs if trained[r[0]]]
    assert texts == ["<|im_start|>assistant\nBlue.<|im_end|>\n",
                     "<|im_start|>assistant\n<think>\n\n</think>\n\n红色。<|im_end|>\n"]
    assert row["input_ids"][-1] < 0 and sum(v < 0 for v in row["input_ids"]) == 1


def test_the_stage_accounts_for_its_cpu_per_phase_on_each_blocks_first_row(qwen_dir):
    """The phases (``cpu_ns`` on a block's first row) add up to the stage's own CPU time, its
    setup included, so the build's budget (the manifest's ``timing``) leaves out nothing the
    stage did."""
    c0 = time.thread_time_ns()
    stage = Tokenize(TokenizeSpec.of(qwen_dir, S, pad_token="<|extra_0|>"))
    measured = time.thread_time_ns() - c0
    batches = [batch(alpaca_samples(64, seed=s) + [b"{broken"]) for s in range(6)]
    counted = np.zeros(len(PHASES), np.int64)
    for b in batches:
        c0 = time.thread_time_ns()
        out = stage(b)
        measured += time.thread_time_ns() - c0
        cpu = out["cpu_ns"].to_pylist()
        assert all(x is None for x in cpu[1:]) and len(cpu[0]) == len(PHASES)
        counted += cpu[0]
    phases = dict(zip(PHASES, counted.tolist()))
    assert min(phases.values()) >= 0 and phases["encode"] > 0 and phases["render"] > 0
    assert phases["setup"] > 0
    assert 0.9 * measured <= counted.sum() <= measured
