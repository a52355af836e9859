"""The MMIDIDX format: bytes as the contract lays them out, the reader, every layout check."""

from __future__ import annotations

import io
import shutil
import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sftprep import idxmap
from sftprep.idxmap import IndexedReader, IndexedWriter, LayoutError, check_sft_layout

PAD = 7
S = 8


def write(prefix, rows: np.ndarray) -> str:
    with open(f"{prefix}.bin", "wb") as b:
        w = IndexedWriter(b)
        if len(rows):
            w.add_documents(rows)
    with open(f"{prefix}.idx", "wb") as i:
        w.write_index(i)
    return str(prefix)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), min_size=3, max_size=3), max_size=20))
def test_idx_bytes_follow_the_contract_table(rows):
    rows = np.asarray(rows, dtype=np.int32).reshape(-1, 3)
    b, i = io.BytesIO(), io.BytesIO()
    w = IndexedWriter(b)
    w.add_documents(rows)
    w.write_index(i)
    n = len(rows)
    expected = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 4, n, n + 1)
    expected += struct.pack(f"<{n}i", *[3] * n) + struct.pack(f"<{n}q", *[12 * k for k in range(n)])
    expected += struct.pack(f"<{n + 1}q", *range(n + 1))
    assert i.getvalue() == expected
    assert b.getvalue() == rows.astype("<i4").tobytes()


def sample_doc(lengths: list[int], seed: int = 0) -> np.ndarray:
    """A valid SFT row: samples of the given lengths, first half untrained, then padding."""
    rnd = np.random.default_rng(seed)
    inputs, labels = [], []
    for n in lengths:
        ids = rnd.integers(10, 100, n)
        lab = np.full(n, -100)
        lab[n // 2:n - 1] = ids[n // 2 + 1:]
        ids[-1] = -1 - ids[-1]
        inputs += ids.tolist()
        labels += lab.tolist()
    pad = S - len(inputs)
    return np.asarray(inputs + [PAD] * pad + labels + [-100] * pad, dtype=np.int32)


@pytest.fixture
def valid(tmp_path):
    rows = np.stack([sample_doc([3, 4], 1), sample_doc([8], 2), sample_doc([2], 3)])
    return write(tmp_path / "ok", rows), rows


def test_reader_round_trip_and_valid_file_passes(valid):
    prefix, rows = valid
    r = IndexedReader(prefix)
    assert len(r) == 3 and np.array_equal(r.document(1), rows[1])
    figures = check_sft_layout(r, S, PAD, 100)
    assert figures == {"documents": 3, "samples": 4, "tokens": 17, "pad": 7, "seq_length": S}


CORRUPTIONS = {
    "label is not the next input id": lambda r: r[0].__setitem__(S + 1, 55),
    "no sample boundary": lambda r: r[1].__setitem__(7, 5),
    "padding is not the pad id": lambda r: r[2].__setitem__(5, 9),
    "a trained label in the padding": lambda r: r[2].__setitem__(S + 5, PAD),
    "label below 0": lambda r: r[0].__setitem__(S + 2, -5),
    "a trained label at a sample boundary": lambda r: r[0].__setitem__(S + 2, 50),
    "out of the vocabulary": lambda r: r[1].__setitem__(0, 1000),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_each_broken_invariant_is_found_with_its_document(tmp_path, valid, what):
    _, rows = valid
    rows = rows.copy()
    CORRUPTIONS[what](rows)
    prefix = write(tmp_path / "bad", rows)
    with pytest.raises(LayoutError, match=what) as e:
        check_sft_layout(IndexedReader(prefix), S, PAD, 100)
    assert "document" in str(e.value)


def test_structural_damage_is_found(tmp_path, valid):
    prefix, _ = valid
    shutil.copy(prefix + ".bin", tmp_path / "cut.bin")
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    (tmp_path / "cut.idx").write_bytes(idx[:-8])
    with pytest.raises(LayoutError, match="header promises"):
        IndexedReader(str(tmp_path / "cut"))
    (tmp_path / "cut.idx").write_bytes(b"XXXXXXXXX" + idx[9:])
    with pytest.raises(LayoutError, match="bad magic"):
        IndexedReader(str(tmp_path / "cut"))
    (tmp_path / "cut.idx").write_bytes(idx)
    (tmp_path / "cut.bin").write_bytes(open(prefix + ".bin", "rb").read()[:-4])
    with pytest.raises(LayoutError, match=".bin holds"):
        check_sft_layout(IndexedReader(str(tmp_path / "cut")), S, PAD)
    with pytest.raises(LayoutError, match="expected 2\\*S"):
        check_sft_layout(IndexedReader(prefix), S + 1, PAD)


def test_inferred_pad_when_none_given(tmp_path, valid):
    prefix, _ = valid
    assert check_sft_layout(IndexedReader(prefix))["pad"] == 7
    assert idxmap.read_index(prefix + ".idx").dtype == np.int32


def rules_oracle(rows: np.ndarray, S: int, pad_id: int | None, vocab: int | None):
    """The layout's rules position by position, the model ``check_rows`` must agree with:
    the figures of a valid block, None for a broken one."""
    totals = {"samples": 0, "tokens": 0, "pad": 0}
    for row in rows:
        inputs, labels = row[:S].tolist(), row[S:].tolist()
        bounds = [c for c in range(S) if inputs[c] < 0]
        if not bounds:
            return None
        last = bounds[-1]
        pad = pad_id if pad_id is not None else (inputs[last + 1] if last < S - 1 else 0)
        ids = [-1 - x if x < 0 else x for x in inputs]
        for c in range(S):
            trained = labels[c] != -100
            if vocab is not None and (ids[c] >= vocab or labels[c] >= vocab):
                return None
            if labels[c] < 0 and trained:
                return None
            if trained and (inputs[c] < 0 or c == S - 1 or labels[c] != ids[c + 1]):
                return None
            if c > last and (inputs[c] != pad or trained):
                return None
        totals["samples"] += len(bounds)
        totals["tokens"] += last + 1
        totals["pad"] += S - 1 - last
    return totals


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 8), min_size=1, max_size=3),
                          st.integers(0, 10**6),
                          st.none() | st.tuples(st.integers(0, 2 * S - 1),
                                                st.sampled_from([-100, -7, -1, 0, 5, 42,
                                                                 PAD, 1000]))),
                min_size=1, max_size=6),
       st.sampled_from([PAD, None]), st.sampled_from([100, None]))
@example([([S - 1], 1, (S - 1, 1000))], None, 100)  # the only padding: an id past the vocabulary
def test_check_rows_agrees_with_the_rules_position_by_position(docs, pad_id, vocab):
    """``check_rows`` checks a block's used width in full and the rest as padding only; its
    verdict and figures must be the rules' on every position, valid and damaged rows alike."""
    rows = []
    for lengths, seed, damage in docs:
        lengths = [n for n in lengths if n >= 2]
        if not lengths or sum(lengths) > S:
            lengths = [S]  # a row full up to S
        row = sample_doc(lengths, seed)
        if damage:
            row[damage[0]] = damage[1]
        rows.append(row)
    rows = np.stack(rows)
    want = rules_oracle(rows, S, pad_id, vocab)
    got = {"samples": 0, "tokens": 0, "pad": 0}
    try:
        idxmap.check_rows(0, rows, S, pad_id, vocab, got)
    except LayoutError:
        got = None
    assert got == want
