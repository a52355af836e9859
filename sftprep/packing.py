"""Grouping whole samples into documents of at most ``S`` tokens.

A packer takes the samples of one input line at a time (a *group*: one sample for a dict line,
several for a pre-packed list line) and yields documents, each a list of samples whose lengths sum
to at most ``S``. The build packs real samples with these classes and the stats job packs bare
lengths with the same classes, so projected and achieved efficiency agree.

Example, ``S = 10``, groups ``[6] [5] [3, 4] [2]`` (sample lengths):

- ``none`` (``GreedyPacker(10, per_group=True)``): ``[6] [5] [3, 4] [2]`` (a list line packs
  within itself, never with its neighbours); efficiency 20/40.
- ``sequential`` (``GreedyPacker(10, per_group=False)``): ``[6] [5, 3] [4, 2]``; 20/30.
- ``bfd`` (``BestFitPacker(10, window)``): a group that fits stays whole (``[3, 4]`` is one unit
  of 7); units go largest first into the fullest document they fit: ``[3, 4, 2] [6] [5]``; 20/30.

Copies: a piece may name the input record it comes from (``Piece.record``). Two groups holding
the same record (copies of it, from a repeated source) never share a document: ``sequential``
closes the document before the second, ``bfd`` skips documents that hold the record already.
Pieces without a record (None) are never held apart, so output without copies is unchanged.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Protocol, Sequence

MODES = ("none", "sequential", "bfd")


@dataclass
class Piece:
    """One sample to pack: its token count and whatever the caller needs back (its arrays)."""

    length: int
    payload: Any = None
    record: Hashable = None  # the input record it comes from; copies never share a document


Document = list[Piece]


class Packer(Protocol):
    def add(self, group: Sequence[Piece]) -> Iterator[Document]: ...

    def flush(self) -> Iterator[Document]: ...


def make_packer(mode: str, seq_length: int, window: int) -> Packer:
    if mode == "none":
        return GreedyPacker(seq_length, per_group=True)
    if mode == "sequential":
        return GreedyPacker(seq_length, per_group=False)
    if mode == "bfd":
        return BestFitPacker(seq_length, window)
    raise ValueError(f"packing mode {mode!r}: choose one of {', '.join(MODES)}")


def _check(piece: Piece, seq_length: int) -> None:
    if not 0 < piece.length <= seq_length:
        raise ValueError(f"sample of {piece.length} tokens cannot be packed into S={seq_length}")


class GreedyPacker:
    """The reference's packer: add the next sample while the total stays <= S, else start anew.

    ``per_group=True`` closes the document at the end of every group (no packing across lines).
    """

    def __init__(self, seq_length: int, per_group: bool):
        self.seq_length = seq_length
        self.per_group = per_group
        self._doc: Document = []
        self._used = 0
        self._records: dict = {}  # record -> the group that brought it into this document
        self._groups = 0

    def add(self, group: Sequence[Piece]) -> Iterator[Document]:
        self._groups += 1
        for piece in group:
            _check(piece, self.seq_length)
            if (self._used + piece.length > self.seq_length
                    or self._records.get(piece.record, self._groups) != self._groups):
                yield from self.flush()
            self._doc.append(piece)
            self._used += piece.length
            if piece.record is not None:
                self._records[piece.record] = self._groups
        if self.per_group:
            yield from self.flush()

    def flush(self) -> Iterator[Document]:
        if self._doc:
            doc, self._doc, self._used, self._records = self._doc, [], 0, {}
            yield doc


@dataclass(order=True)
class _Unit:
    """Samples that must share a document (a pre-packed line, or a greedy piece of one)."""

    length: int
    seq: int
    pieces: list[Piece] = field(compare=False)
    group: int = field(default=0, compare=False)  # the input group it came from
    records: frozenset = field(default=frozenset(), compare=False)  # its pieces' records


@dataclass
class _Bin:
    seq: int
    used: int = 0
    units: list[_Unit] = field(default_factory=list)
    records: dict = field(default_factory=dict)  # record -> its group

    def holds_other_copy(self, unit: _Unit) -> bool:
        return any(self.records.get(r, unit.group) != unit.group for r in unit.records)


class BestFitPacker:
    """Best-fit-decreasing over a sliding window of ``window`` units, so memory stays bounded.

    When the window is full its units are placed largest first, each into the open document
    with the least room that still fits it (ties: the older document). All documents are then
    emitted except the emptiest one, whose units go back to the window to be topped up by the
    samples that follow. A group that fits in ``S`` stays one unit; a longer group is cut
    greedily, in order, into units that fit. The result depends only on the input order.
    """

    def __init__(self, seq_length: int, window: int):
        if window < 1:
            raise ValueError(f"pack window must be >= 1, got {window}")
        self.seq_length = seq_length
        self.window = window
        self._units: list[_Unit] = []
        self._seq = 0
        self._groups = 0

    def add(self, group: Sequence[Piece]) -> Iterator[Document]:
        self._groups += 1
        for doc in GreedyPacker(self.seq_length, per_group=True).add(group):
            records = frozenset(p.record for p in doc if p.record is not None)
            self._units.append(_Unit(sum(p.length for p in doc), self._seq, doc, self._groups,
                                     records))
            self._seq += 1
        if len(self._units) >= self.window:
            bins = self._best_fit()
            keep = min(bins, key=lambda b: (b.used, -b.seq))
            self._units = sorted(keep.units, key=lambda u: u.seq)
            yield from (self._document(b) for b in bins if b is not keep)

    def flush(self) -> Iterator[Document]:
        bins = self._best_fit() if self._units else []
        self._units = []
        yield from (self._document(b) for b in bins)

    def _best_fit(self) -> list[_Bin]:
        bins: list[_Bin] = []
        room: list[tuple[int, int]] = []  # (space left, bin number), sorted
        for unit in sorted(self._units, key=lambda u: (-u.length, u.seq)):
            at = bisect.bisect_left(room, (unit.length, -1))
            records = unit.records
            while records and at < len(room) and bins[room[at][1]].holds_other_copy(unit):
                at += 1  # the next fullest document it fits
            if at == len(room):
                target = _Bin(len(bins))
                bins.append(target)
            else:
                target = bins[room.pop(at)[1]]
            target.units.append(unit)
            target.used += unit.length
            target.records.update(dict.fromkeys(records, unit.group))
            bisect.insort(room, (self.seq_length - target.used, target.seq))
        return bins

    @staticmethod
    def _document(b: _Bin) -> Document:
        return [piece for unit in sorted(b.units, key=lambda u: u.seq) for piece in unit.pieces]
