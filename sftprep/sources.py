"""Reading: expand inputs to files, plan read tasks, stream records as raw bytes with their origin.

Records are not parsed here. A read task streams one file, or one range of a large file, and
yields blocks of ``SCHEMA`` rows: ``task`` (the read task's index; tasks are numbered in input
order), ``file`` (the input's index in the expanded, sorted file list), ``line`` (1-based, counted
from the start of the task's range; Parquet: the 0-based row, counted the same way), ``element``
(a JSON array's element index, -1 for a whole line or row) and ``text`` (the record's raw bytes).
``(task, line, element)`` is the global order key. Broken bytes travel on unchanged, so the
tokenizer stage can reject them with their origin instead of a read task failing the whole file.

A task's last row has ``text`` null and ``line`` = how many lines (newlines; Parquet: rows) the
task read. ``Origins``, fed the rows in input order, adds those counts up to the true line of
every record, so a large file is split without a pass over it first.

``.jsonl`` files hold one record a line (blank lines are skipped; a UTF-8 byte-order mark and
CRLF line ends are accepted). ``.json`` files hold one JSON array whose elements are split out by
a streaming scanner, so neither kind is ever held whole in memory; a ``.json`` file that does not
start with ``[`` is read as JSON Lines. ``.gz`` is decompressed on the fly. ``.parquet`` files
are read a row group at a time and each row becomes the JSON object of its columns (nulls inside
structs left out, as a JSON writer would), so every later stage sees one kind of record.

Splitting (``plan_reads``): an uncompressed ``.jsonl`` file larger than ``split_bytes`` is cut
into byte ranges, each owning the lines that start inside it; a Parquet file into runs of whole
row groups of about ``split_bytes``; ``.json`` arrays and ``.gz`` files stay one task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import orjson
import pyarrow as pa

from sftprep.errors import Error
from sftprep.storage import filesystem

EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
SCHEMA = pa.schema([("task", pa.int32()), ("file", pa.int32()), ("line", pa.int64()),
                    ("element", pa.int32()), ("text", pa.binary())])
ORIGIN = ("task", "file", "line", "element")  # the columns every later stage carries on
BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20
_PARQUET_BATCH = 1024  # rows converted at a time within a row group
_LEADING = BOM + b" \t\r\n"  # bytes lstrip() removes before a file's first value
# Default split: about this many read tasks per CPU of the cluster, none smaller than MIN_SPLIT
# (a small file stays one task: reading is cheap next to tokenizing).
READS_PER_CPU = 4
MIN_SPLIT = 32 << 20


class InputError(Error, ValueError):
    """An input path matched nothing readable; the message names it."""


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int


def expand_inputs(inputs: list[str], storage_options: dict | None = None) -> list[InputFile]:
    """Files, directories (searched recursively) and globs, sorted and unique; directories and
    globs keep only EXTENSIONS, so a stray README or .txt beside the data is never read."""
    found: dict[str, int] = {}
    for spec in inputs:
        fs, path = filesystem(spec, storage_options)
        if any(c in path for c in "*?["):
            paths = [p for p in fs.glob(path) if p.endswith(EXTENSIONS)]
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.endswith(EXTENSIONS)]
        elif fs.exists(path):
            paths = [path]
        else:
            raise InputError(f"input {spec!r} does not exist")
        if not paths:
            raise InputError(f"input {spec!r} matched no {'/'.join(EXTENSIONS)} file")
        for p in paths:
            url = fs.unstrip_protocol(p) if "://" in spec else p
            found[url] = fs.size(p)
    return [InputFile(url, found[url]) for url in sorted(found)]


def is_parquet(url: str) -> bool:
    return url.endswith(".parquet")


def _splittable(url: str) -> bool:
    return url.endswith(".jsonl") or is_parquet(url)


@dataclass(frozen=True)
class ReadRange:
    """What one read task reads: all of file ``file`` (``end`` None), or a part of it: bytes
    ``[start, end)`` of a JSONL file (the lines starting there), row groups ``[start, end)`` of a
    Parquet file."""

    file: int
    url: str
    start: int = 0
    end: int | None = None
    size: int = 0  # bytes, for Ray Data's estimates


def auto_split_bytes(files: list[InputFile], cpus: float) -> int:
    """The default ``split_bytes``: about READS_PER_CPU tasks per CPU over all the input, in
    ranges of at least MIN_SPLIT."""
    total = sum(f.size for f in files)
    return max(MIN_SPLIT, math.ceil(total / (READS_PER_CPU * max(1.0, cpus))))


def plan_reads(files: list[InputFile], split_bytes: int, storage_options: dict | None = None
               ) -> list[ReadRange]:
    """The read tasks, in input order. ``split_bytes`` 0: one task per file."""
    plan = []
    for index, f in enumerate(files):
        if not split_bytes or f.size <= split_bytes or not _splittable(f.url):
            plan.append(ReadRange(index, f.url, size=f.size))
        elif is_parquet(f.url):
            plan += _row_group_runs(index, f, split_bytes, storage_options)
        else:
            n = math.ceil(f.size / split_bytes)
            cuts = [f.size * k // n for k in range(n + 1)]
            plan += [ReadRange(index, f.url, a, b, b - a) for a, b in zip(cuts, cuts[1:])]
    return plan


def _row_group_runs(index: int, f: InputFile, split_bytes: int, storage_options: dict | None
                    ) -> list[ReadRange]:
    """Consecutive row groups of about ``split_bytes`` (compressed) each; reads the footer only."""
    import pyarrow.parquet as pq
    fs, path = filesystem(f.url, storage_options)
    with fs.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    sizes = [sum(meta.row_group(g).column(c).total_compressed_size
                 for c in range(meta.num_columns)) for g in range(meta.num_row_groups)]
    runs, first, acc = [], 0, 0
    for g, size in enumerate(sizes):
        acc += size
        if acc >= split_bytes or g == len(sizes) - 1:
            runs.append(ReadRange(index, f.url, first, g + 1, acc))
            first, acc = g + 1, 0
    return runs or [ReadRange(index, f.url, size=f.size)]


def read_range(r: ReadRange, task: int, storage_options: dict | None,
               block_records: int) -> Iterator[pa.Table]:
    """Stream one read task as Arrow tables of at most ``block_records`` rows (the task body);
    the last row is the task's end row."""
    fs, path = filesystem(r.url, storage_options)
    rows: list[tuple[int, int, bytes | None]] = []
    with fs.open(path, "rb", compression=None if r.end is not None else "infer") as f:
        if is_parquet(r.url):
            items = _parquet_rows(f, r.start, r.end)
        else:
            items = iter_records(f, is_array_file=r.url.endswith((".json", ".json.gz")),
                                 start=r.start, end=r.end)
        for item in items:
            rows.append(item)
            if len(rows) >= block_records:
                yield record_table(task, r.file, rows)
                rows = []
    if rows:
        yield record_table(task, r.file, rows)


def record_table(task: int, file: int, rows: list[tuple[int, int, bytes | None]]) -> pa.Table:
    """Read-stage rows of one task from ``(line, element, text)``; text None: the end row."""
    lines, elements, texts = zip(*rows) if rows else ((), (), ())
    n = len(rows)
    return pa.table([pa.array([task] * n, pa.int32()), pa.array([file] * n, pa.int32()),
                     pa.array(lines, pa.int64()), pa.array(elements, pa.int32()),
                     pa.array(texts, pa.binary())], schema=SCHEMA)


def iter_records(f: BinaryIO, is_array_file: bool, chunk_size: int = _CHUNK, start: int = 0,
                 end: int | None = None) -> Iterator[tuple[int, int, bytes | None]]:
    """``(line, element, raw bytes)`` of every record in an open binary stream, then the end
    row ``(lines read, -1, None)``. With ``end``: only the lines starting in bytes
    ``[start, end)``, numbered from that range's first line."""
    if start:
        head, start = _skip_partial_line(f, start, chunk_size)
    else:
        head = f.read(chunk_size)
        while head and not head.lstrip(_LEADING):  # up to the first byte that tells the kind
            more = f.read(chunk_size)
            if not more:
                break
            head += more
    limit = None if end is None else end - start
    if is_array_file and end is None and head.lstrip(_LEADING)[:1] == b"[":
        yield from _array_elements(head, f, chunk_size)
    else:
        yield from _lines(head, f, chunk_size, limit, file_start=start == 0)


def _skip_partial_line(f: BinaryIO, start: int, chunk_size: int) -> tuple[bytes, int]:
    """Seek to the first line start at or after ``start``: ``(bytes from there, its offset)``."""
    f.seek(start - 1)
    at = start - 1
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            return b"", at
        cut = chunk.find(b"\n")
        if cut >= 0:
            return chunk[cut + 1:] or f.read(chunk_size), at + cut + 1
        at += len(chunk)


def _lines(head: bytes, f: BinaryIO, chunk_size: int, limit: int | None, file_start: bool
           ) -> Iterator[tuple[int, int, bytes | None]]:
    """Lines starting before byte ``limit`` of the stream (None: all), then the end row.
    ``file_start``: the stream starts the file, whose first line may begin with a BOM (a part
    of that line for the byte ranges, not of its record)."""
    number, offset, pending, chunk = 0, 0, [], head  # offset: where the current line starts
    while chunk:
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            if limit is not None and offset >= limit:
                yield number, -1, None
                return
            if pending:
                part = b"".join(pending) + part
                pending = []
            number += 1
            offset += len(part) + 1
            if number == 1 and file_start and part.startswith(BOM):
                part = part[len(BOM):]
            if part.strip():
                yield number, -1, part.rstrip(b"\r")
        pending.append(parts[-1])
        chunk = f.read(chunk_size)
    last = b"".join(pending)
    if number == 0 and file_start and last.startswith(BOM):
        last = last[len(BOM):]
    if last.strip() and (limit is None or offset < limit):
        yield number + 1, -1, last.rstrip(b"\r")
    yield number, -1, None


# A complete JSON string, a lone quote (a string cut by the chunk end), or a structural byte.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{},]')


def _array_elements(head: bytes, f: BinaryIO, chunk_size: int
                    ) -> Iterator[tuple[int, int, bytes | None]]:
    """Split a top-level JSON array into its elements' raw bytes without parsing them:
    ``(line, index in the array, bytes)``, then the end row.

    An array cut short (a truncated file) yields its last element behind a ``[``, so the parser
    rejects it as truncated with its line (a number cut short would parse) instead of the whole
    file being lost.
    """
    buf = head
    pos = buf.index(b"[") + 1
    start, depth, index = pos, 1, 0
    counted_pos, counted_line = 0, 1  # the line number at buf[counted_pos]
    eof = False

    def line_at(p: int) -> int:
        nonlocal counted_pos, counted_line
        counted_line += buf.count(b"\n", counted_pos, p)
        counted_pos = p
        return counted_line

    def element(end: int) -> tuple[int, int, bytes] | None:
        nonlocal index
        raw = buf[start:end]
        text = raw.strip()
        if not text:
            return None
        index += 1
        return line_at(start + (len(raw) - len(raw.lstrip()))), index - 1, text

    while True:
        m = _TOKENS.search(buf, pos)
        if m is None or m.group() == b'"':
            if eof:
                item = element(len(buf))
                if item:
                    yield item[0], item[1], b"[" + item[2]
                break
            chunk = f.read(chunk_size)
            eof = not chunk
            # Drop what is consumed; keep the current element and the line count consistent.
            line_at(start)
            buf, pos, counted_pos = buf[start:] + chunk, pos - start, 0
            start = 0
            continue
        tok = m.group()
        pos = m.end()
        if tok in (b"{", b"["):
            depth += 1
        elif tok in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                item = element(m.start())
                if item:
                    yield item
                break
        elif tok == b"," and depth == 1:
            item = element(m.start())
            if item:
                yield item
            start = pos
    yield line_at(min(pos, len(buf))) - 1, -1, None  # an array file is never split: any count


def _parquet_rows(f: BinaryIO, first_group: int, end_group: int | None
                  ) -> Iterator[tuple[int, int, bytes | None]]:
    """``(row, -1, JSON object of the row)`` for row groups ``[first_group, end_group)`` (None:
    to the last), a row group at a time, then the end row ``(rows read, -1, None)``."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(f)
    groups = list(range(first_group, pf.num_row_groups if end_group is None else end_group))
    row = 0
    for g in groups:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[g]):
            for values in batch.to_pylist():
                try:
                    text = orjson.dumps(_drop_nulls(values), default=_json_default)
                except orjson.JSONEncodeError as e:  # rejected downstream, with this text
                    text = f"row not representable as JSON: {e}".encode()
                yield row, -1, text
                row += 1
    yield row, -1, None


def _drop_nulls(value):
    """A row's value with null struct fields left out: Parquet gives every struct in a column
    every field of the column's type, a JSON writer only the fields the record has."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_default(value):
    """Values orjson does not write itself: binary columns as text (UTF-8 or the row is
    rejected), the rest (decimals, ...) as their string, which the record parser then accepts or
    rejects like any other value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


class Origins:
    """True positions of records, for a consumer that sees the read rows in input order.

    A read task numbers lines from the start of its range; its end row says how many it read.
    The file's earlier tasks' counts, added up as their end rows pass, turn a range's line into
    the file's line. The same bookkeeping checks that every task arrives whole and in order:
    a task's rows may only follow the previous task's end row, and ``finish`` wants them all.
    """

    def __init__(self, files: list[str], task_files: list[int],
                 tasks: tuple[int, int] | None = None):
        """``tasks``: the first and last task expected (a shard's; default: all)."""
        self.files = files
        self.task_files = task_files  # the file index of every read task
        first, self.last = tasks or (0, len(task_files) - 1)
        self.task = first - 1         # the task whose rows are arriving
        self.ended = True             # its end row has passed
        self.before = 0               # lines of its file before its range

    def enter(self, task: int) -> None:
        """A row of ``task`` arrives."""
        if task == self.task and not self.ended:
            return
        if not (self.ended and task == self.task + 1 and task < len(self.task_files)):
            raise RuntimeError(f"read task {task} arrived after task {self.task} "
                               f"{'ended' if self.ended else 'was still arriving'}; the "
                               "ordered stage needs every task whole and in order")
        if self.task >= 0 and self.task_files[task] != self.task_files[self.task]:
            self.before = 0
        self.task, self.ended = task, False

    def end(self, task: int, count: int) -> None:
        """``task``'s end row: it read ``count`` lines (rows)."""
        self.enter(task)
        self.ended = True
        self.before += count

    def finish(self) -> None:
        if not (self.ended and self.task == self.last):
            missing = self.task + 1 if self.ended else self.task
            raise RuntimeError(f"read task {missing} of {len(self.task_files)} never ended: "
                               "input went missing")

    def locate(self, file: int, line: int, element: int) -> dict:
        """``{"file", "line" | "row", "element"?}`` of a record of the current task."""
        url = self.files[file]
        where = {"file": url, "row" if is_parquet(url) else "line": self.before + line}
        if element >= 0:
            where["element"] = element
        return where


def describe(where: dict) -> str:
    """``file:line``, ``file:row N``, ``file:line element K``: how errors name a record."""
    text = f"{where['file']}:" + (f"row {where['row']}" if "row" in where else f"{where['line']}")
    return text + (f" element {where['element']}" if "element" in where else "")
