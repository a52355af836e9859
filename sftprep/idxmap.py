"""Megatron's memory-mapped indexed dataset (MMIDIDX), in the SFT layout Pai-Megatron-Patch reads.

Byte layout of ``<prefix>.idx`` (little-endian), as Megatron-LM's ``indexed_dataset.py`` writes it::

    9 bytes      magic  b"MMIDIDX\\x00\\x00"
    <Q           version = 1
    <B           dtype code (DTYPE_CODES below; sftprep always writes int32 = 4)
    <Q           sequence count n
    <Q           document count d + 1
    int32[n]     sequence lengths, in elements
    int64[n]     sequence pointers: byte offset of each sequence in .bin
    int64[d+1]   document index: [0, ...], entry k = sequences before the end of document k

``<prefix>.bin`` holds the sequences back to back in that dtype.

The SFT layout on top (``docs/pai-sft-layout`` in the brief): every document is exactly one
sequence of ``2*S`` int32 values, ``S`` input ids then ``S`` labels. The last input of every sample
is stored as ``-1 - id`` (the sample boundary); labels are the next input id where trained, else
``-100``; a document is padded with the pad id (inputs) and ``-100`` (labels).

This module knows nothing about Ray or tokenizers: constants, a writer, a reader, and the checks
of every invariant of the layout.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER = struct.Struct("<9sQBQQ")
IGNORE_INDEX = -100
SFT_DTYPE = np.dtype(np.int32)
MANIFEST = ".manifest.json"  # beside the pair: what the build wrote, read by inspect/verify


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class IndexedWriter:
    """Appends documents of one sequence each to a .bin stream; writes the .idx at ``finalize``.

    Only the sequence lengths are kept in memory (4 bytes a document), never the data.
    """

    def __init__(self, bin_file: BinaryIO, dtype: np.dtype = SFT_DTYPE):
        self._bin = bin_file
        self.dtype = np.dtype(dtype)
        self._lengths = array("i")

    @property
    def documents(self) -> int:
        return len(self._lengths)

    def add_documents(self, rows: np.ndarray) -> None:
        """Write ``rows`` (shape ``[k, L]``): k documents, each one sequence of L elements."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2:
            raise ValueError(f"expected a 2-D array of documents, got shape {rows.shape}")
        self._bin.write(rows.data)
        self._lengths.extend([rows.shape[1]] * rows.shape[0])

    def write_index(self, idx_file: BinaryIO) -> None:
        n = len(self._lengths)
        idx_file.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], n, n + 1))
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if n else np.zeros(0, np.int32)
        idx_file.write(lengths.tobytes())
        pointers = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
        idx_file.write(pointers.tobytes())
        idx_file.write(np.arange(n + 1, dtype=np.int64).tobytes())


@dataclass(frozen=True)
class Index:
    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_index: np.ndarray


def read_index(path: str) -> Index:
    """Parse an .idx file; raises ``LayoutError`` on a malformed header or size."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < HEADER.size:
        raise LayoutError(f"{path}: {raw.size} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, code, n, d = HEADER.unpack(raw[: HEADER.size].tobytes())
    if magic != MAGIC:
        raise LayoutError(f"{path}: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise LayoutError(f"{path}: version {version}, expected {VERSION}")
    if code not in CODE_DTYPES:
        raise LayoutError(f"{path}: unknown dtype code {code}")
    expected = HEADER.size + 4 * n + 8 * n + 8 * d
    if raw.size != expected:
        raise LayoutError(f"{path}: {raw.size} bytes, header promises {expected}")
    off = HEADER.size
    lengths = np.frombuffer(raw, np.int32, n, off)
    pointers = np.frombuffer(raw, np.int64, n, off + 4 * n)
    docs = np.frombuffer(raw, np.int64, d, off + 12 * n)
    return Index(CODE_DTYPES[code], lengths, pointers, docs)


class IndexedReader:
    """Memory-maps ``<prefix>.bin/.idx``; ``document(k)`` returns document k's values."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = read_index(idx_path(prefix))
        size = os.path.getsize(bin_path(prefix))
        self.data = (np.memmap(bin_path(prefix), dtype=self.index.dtype, mode="r")
                     if size else np.zeros(0, self.index.dtype))

    def __len__(self) -> int:
        return len(self.index.document_index) - 1

    def document(self, k: int) -> np.ndarray:
        ix = self.index
        first, last = ix.document_index[k], ix.document_index[k + 1]
        if last == first:
            return self.data[:0]
        start = ix.sequence_pointers[first] // ix.dtype.itemsize
        stop = ix.sequence_pointers[last - 1] // ix.dtype.itemsize + ix.sequence_lengths[last - 1]
        return self.data[start:stop]

    def rows(self, chunk: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_document, rows[k, 2S])`` chunks of a verified uniform SFT file.

        Plain reads, not slices of the memory map: pages read through a map stay in this
        process's RSS while the map lives, so checking a 16 GB file would hold 16 GB.
        """
        width = int(self.index.sequence_lengths[0]) if len(self) else 0
        if not width:
            return
        with open(bin_path(self.prefix), "rb") as f:
            for first in range(0, len(self), chunk):
                k = min(chunk, len(self) - first)
                yield first, np.fromfile(f, self.index.dtype, k * width).reshape(k, width)


class LayoutError(ValueError):
    """A file breaks the SFT idxmap contract; the message names the first violation."""


def check_sft_layout(reader: IndexedReader, seq_length: int | None = None,
                     pad_id: int | None = None, vocab_size: int | None = None,
                     contents: bool = True, also=None) -> dict:
    """Check every invariant of the SFT layout; raise ``LayoutError`` at the first violation.

    Returns the figures it saw (documents, samples, tokens, pad). ``seq_length``, ``pad_id`` and
    ``vocab_size`` are checked when given (the build's manifest gives them), else inferred.
    ``contents=False`` checks the index and the file sizes only: for a writer that ran
    ``check_rows`` on every document before writing it. ``also(first, rows, S)``, if given, sees
    every chunk of checked rows too (more checks in the same pass over the ``.bin``).
    """
    totals = check_index(reader.index, reader.data.size * SFT_DTYPE.itemsize, seq_length)
    if contents and totals["documents"]:
        seq_length = totals["seq_length"]
        for first, rows in reader.rows():
            check_rows(first, rows, seq_length, pad_id, vocab_size, totals)
            if also:
                also(first, rows, seq_length)
    return totals


def check_index(ix: Index, bin_bytes: int, seq_length: int | None = None) -> dict:
    """The index's invariants and the .bin size it promises (``bin_bytes``), without reading
    the .bin: for a writer whose .bin is already streaming to a store."""
    n = len(ix.document_index) - 1
    if ix.dtype != SFT_DTYPE:
        raise LayoutError(f"dtype {ix.dtype}, the SFT layout needs int32 (negative values)")
    if len(ix.sequence_lengths) != n:
        raise LayoutError(f"{len(ix.sequence_lengths)} sequences for {n} documents; "
                          "every document must be exactly one sequence")
    if not np.array_equal(ix.document_index, np.arange(n + 1)):
        bad = int(np.argmax(ix.document_index != np.arange(n + 1)))
        raise LayoutError(f"document index entry {bad} is {ix.document_index[bad]}, expected {bad}")
    totals = {"documents": n, "samples": 0, "tokens": 0, "pad": 0, "seq_length": seq_length}
    if n == 0:
        return totals
    width = int(ix.sequence_lengths[0])
    if seq_length is None:
        seq_length = totals["seq_length"] = width // 2
    if width != 2 * seq_length:
        raise LayoutError(f"document 0 has {width} values, expected 2*S = {2 * seq_length}")
    if np.any(ix.sequence_lengths != width):
        bad = int(np.argmax(ix.sequence_lengths != width))
        raise LayoutError(f"document {bad} has {ix.sequence_lengths[bad]} values, expected {width}")
    expected_ptr = np.arange(n, dtype=np.int64) * width * SFT_DTYPE.itemsize
    if not np.array_equal(ix.sequence_pointers, expected_ptr):
        bad = int(np.argmax(ix.sequence_pointers != expected_ptr))
        raise LayoutError(f"document {bad} starts at byte {ix.sequence_pointers[bad]}, "
                          f"expected {expected_ptr[bad]}")
    if bin_bytes != n * width * SFT_DTYPE.itemsize:
        raise LayoutError(f".bin holds {bin_bytes // SFT_DTYPE.itemsize} values, "
                          f"the index promises {n * width}")
    return totals


def check_rows(first: int, rows: np.ndarray, S: int, pad_id: int | None,
               vocab_size: int | None, totals: dict) -> None:
    """Check documents ``first, first+1, ...`` (``rows[k, 2S]``); add their figures to ``totals``.

    Past the block's last boundary (column ``w``) every row can only be padding, so there only
    that is checked; the rules on samples run on the first ``w`` columns (without packing,
    most of a row is padding).
    """
    inputs, labels = rows[:, :S], rows[:, S:]
    if not len(rows):
        return

    def fail(mask: np.ndarray, what: str, column: int = 0) -> None:
        if mask.any():
            r, c = np.unravel_index(int(np.argmax(mask)), mask.shape)
            raise LayoutError(f"document {first + r}, position {column + c}: {what}")

    boundary = inputs < 0
    fail(~boundary.any(axis=1)[:, None], "no sample boundary (no negative input id)")
    last = S - 1 - np.argmax(boundary[:, ::-1], axis=1)  # each row's last boundary
    w = int(last.max()) + 1
    k = len(rows)
    # Every row pads with one id: the pad id, or (no pad id given) whatever follows its last
    # boundary, a row full up to S having no padding to compare.
    pad = np.full(k, pad_id if pad_id is not None else 0, dtype=rows.dtype)
    if pad_id is None:
        pad = np.where(last < S - 1, inputs[np.arange(k), np.minimum(last + 1, S - 1)], 0)
    padding = (f"padding is not the pad id {pad_id}" if pad_id is not None
               else "padding is not one repeated pad id")
    fail(inputs[:, w:] != pad[:, None], padding, w)
    fail(labels[:, w:] != IGNORE_INDEX, "a trained label in the padding", w)
    if vocab_size is not None and w < S:
        fail((pad >= vocab_size)[:, None], f"input id out of the vocabulary (size {vocab_size})",
             w)

    inputs, labels, markers = inputs[:, :w], labels[:, :w], boundary[:, :w]
    ids = np.where(markers, -1 - inputs, inputs)
    if vocab_size is not None:
        fail(ids >= vocab_size, f"input id out of the vocabulary (size {vocab_size})")
        fail(labels >= vocab_size, f"label out of the vocabulary (size {vocab_size})")
    fail((labels < 0) & (labels != IGNORE_INDEX), f"label below 0 and not {IGNORE_INDEX}")
    trained = labels != IGNORE_INDEX
    fail(trained & markers, "a trained label at a sample boundary")
    if w == S:
        fail(trained[:, -1:], "a trained label at the last position (no next token)", S - 1)
    nxt = np.zeros_like(ids)  # the last column (a boundary or padding) has no trained label
    nxt[:, :-1] = ids[:, 1:]
    fail(trained & (labels != nxt), "label is not the next input id")
    tail = np.arange(w)[None, :] > last[:, None]  # padding before column w
    fail(tail & (inputs != pad[:, None]), padding)
    fail(tail & trained, "a trained label in the padding")
    totals["samples"] += int(markers.sum())
    tokens = int((last + 1).sum())
    totals["tokens"] += tokens
    totals["pad"] += k * S - tokens
