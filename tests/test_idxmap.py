"""The MMIDIDX format: bytes as the contract lays them out, the reader, every layout check."""

from __future__ import annotations

import io
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
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
