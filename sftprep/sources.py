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
row groups of about ``split_bytes``; a ``.json`` array into ranges of whole elements, cut after
top-level commas found by one scan on the driver that tracks strings and nesting (``_array_runs``;
a range's elements keep their index in the whole array); ``.gz`` files stay one task.

Sources (``parse_source``, ``mixture_plan``): every input is a source, optionally with a selection
(``samples``, ``fraction``, ``repeat``; ``path#N`` on the command line). A file named by two
sources is read once for each. A selection is made in the read task, before anything is parsed:
record ``r`` (its position in the source: files sorted, records in file order) of a pass is kept
iff ``permute(r) < keep``, ``permute`` a bijection of ``[0, M)`` keyed by the seed and the source's
name (``source_name``), so the choice depends on nothing but (seed, name, position) and the count
is exact. ``M`` and each read task's first position come from a counting pass (Parquet: the
footer; other files: one extra read, counting records exactly as the reader yields them). Copy
``c`` of a source is its own pass, placed in round ``c`` after every source's earlier passes, so
copies of a record lie a whole round apart in the order the packer sees.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import dataclass, replace
from typing import BinaryIO, Iterator

import numpy as np
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


SELECTIONS = ("samples", "fraction", "repeat")
DEFAULT_SEED = 42


@dataclass(frozen=True)
class Source:
    """One entry of ``source.inputs``: a path (file, directory or glob) and at most one selection.
    ``spec`` is the entry as written, which names the source in figures and errors."""

    spec: str
    path: str
    samples: int | None = None
    fraction: float | None = None
    repeat: int | None = None

    @property
    def counted(self) -> bool:
        """Whether the selection needs the source's record count (a counting pass)."""
        return self.samples is not None or self.fraction is not None

    def selection(self) -> dict:
        return {k: getattr(self, k) for k in SELECTIONS if getattr(self, k) is not None}


_COUNT_SUFFIX = re.compile(r"^(.*)#(\d+)$")


def parse_source(entry: str | dict, storage_options: dict | None = None) -> Source:
    """A ``source.inputs`` entry as a ``Source``. A string ``path#N`` takes N samples, unless the
    whole string exists as a path (a file really named ``x.jsonl#5``); a mapping
    ``{path, samples | fraction | repeat}`` takes its path literally. Shapes and values are
    checked by ``config.validate``."""
    if isinstance(entry, dict):
        return Source(spec=_mapping_spec(entry), path=str(entry["path"]),
                      **{k: entry[k] for k in SELECTIONS if entry.get(k) is not None})
    m = _COUNT_SUFFIX.match(entry)
    if m and not _exists(entry, storage_options):
        return Source(spec=entry, path=m.group(1), samples=int(m.group(2)))
    return Source(spec=entry, path=entry)


def _mapping_spec(entry: dict) -> str:
    extra = ", ".join(f"{k}: {entry[k]}" for k in SELECTIONS if entry.get(k) is not None)
    return f"{entry['path']}" + (f" ({extra})" if extra else "")


def _exists(spec: str, storage_options: dict | None) -> bool:
    fs, path = filesystem(spec, storage_options)
    return fs.exists(path)


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    source: int = 0  # index of the source that named it


def expand_inputs(inputs: list, storage_options: dict | None = None) -> list[InputFile]:
    """Every source's files (``source.inputs`` entries, see ``parse_source``): files,
    directories (searched recursively) and globs, unique within a source; directories and globs
    keep only EXTENSIONS, so a stray README or .txt beside the data is never read. Ordered by URL
    (then source): a file named by two sources appears once for each."""
    found: dict[tuple[str, int], int] = {}
    for index, entry in enumerate(inputs):
        spec = parse_source(entry, storage_options).path
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
            found[url, index] = fs.size(p)
    return [InputFile(url, found[url, k], k) for url, k in sorted(found)]


def is_parquet(url: str) -> bool:
    return url.endswith(".parquet")


def _splittable(url: str) -> bool:
    return url.endswith((".jsonl", ".json")) or is_parquet(url)


@dataclass(frozen=True)
class ReadRange:
    """What one read task reads: all of file ``file`` (``end`` None), or a part of it: bytes
    ``[start, end)`` of a JSONL file (the lines starting there), row groups ``[start, end)`` of a
    Parquet file, bytes ``[start, end)`` of a JSON array cut after top-level commas (the elements
    there, the first of them element ``element``)."""

    file: int
    url: str
    start: int = 0
    end: int | None = None
    size: int = 0  # bytes, for Ray Data's estimates
    source: int = 0  # the source that named the file
    copy: int = 0    # which pass over the source (``mixture_plan``)
    select: "Selection | None" = None  # None: every record
    element: int = 0  # a JSON array range's first element index

    @property
    def pass_key(self) -> tuple[int, int]:
        """What a range's line numbers count from: its file in this pass (``Origins``)."""
        return self.file, self.copy


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
            plan.append(ReadRange(index, f.url, size=f.size, source=f.source))
        elif is_parquet(f.url):
            plan += _row_group_runs(index, f, split_bytes, storage_options)
        elif f.url.endswith(".json"):
            plan += _array_runs(index, f, split_bytes, storage_options)
        else:
            n = math.ceil(f.size / split_bytes)
            cuts = [f.size * k // n for k in range(n + 1)]
            plan += [ReadRange(index, f.url, a, b, b - a, f.source)
                     for a, b in zip(cuts, cuts[1:])]
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
            runs.append(ReadRange(index, f.url, first, g + 1, acc, f.source))
            first, acc = g + 1, 0
    return runs or [ReadRange(index, f.url, size=f.size, source=f.source)]


def _array_runs(index: int, f: InputFile, split_bytes: int, storage_options: dict | None
                ) -> list[ReadRange]:
    """A JSON array in ranges of about ``split_bytes``, cut after the first top-level comma at or
    past each ``k * size / n``: one scan of the file, which tracks strings and nesting and parses
    no element (a ``.json`` file holding JSON Lines stays one task)."""
    n = math.ceil(f.size / split_bytes)
    targets = [f.size * k // n for k in range(1, n)]
    cuts = [(0, 0)]  # (byte, first element)
    fs, path = filesystem(f.url, storage_options)
    with fs.open(path, "rb") as handle:
        head = _head(handle, _CHUNK)
        if head.lstrip(_LEADING)[:1] != b"[":
            return [ReadRange(index, f.url, size=f.size, source=f.source)]
        for _, element, text, after in _array_scan(head, handle, _CHUNK):
            if text is None or after is None or len(cuts) > len(targets):
                break
            if after >= targets[len(cuts) - 1]:
                cuts.append((after, element + 1))
    ends = [c[0] for c in cuts[1:]] + [f.size]
    return [ReadRange(index, f.url, a, b, b - a, f.source, element=e)
            for (a, e), b in zip(cuts, ends)]


def read_range(r: ReadRange, task: int, storage_options: dict | None,
               block_records: int) -> Iterator[pa.Table]:
    """Stream one read task as Arrow tables of at most ``block_records`` rows (the task body);
    the last row is the task's end row. With ``r.select`` only the selected records come."""
    fs, path = filesystem(r.url, storage_options)
    rows: list[tuple[int, int, bytes | None]] = []
    with fs.open(path, "rb", compression=None if r.end is not None else "infer") as f:
        items = _records(r, f)
        if r.select is not None:
            items = r.select.filter(items, r.url)
        for item in items:
            rows.append(item)
            if len(rows) >= block_records:
                yield record_table(task, r.file, rows)
                rows = []
    if rows:
        yield record_table(task, r.file, rows)


def _records(r: ReadRange, f: BinaryIO) -> Iterator[tuple[int, int, bytes | None]]:
    if is_parquet(r.url):
        return _parquet_rows(f, r.start, r.end)
    return iter_records(f, is_array_file=r.url.endswith((".json", ".json.gz")),
                        start=r.start, end=r.end, element=r.element)


def count_records(r: ReadRange, storage_options: dict | None) -> int:
    """How many records ``read_range`` yields for ``r`` (without a selection): a Parquet range's
    rows from the footer, any other file by reading it as the reader does."""
    fs, path = filesystem(r.url, storage_options)
    with fs.open(path, "rb", compression=None if r.end is not None else "infer") as f:
        if is_parquet(r.url):
            import pyarrow.parquet as pq
            meta = pq.ParquetFile(f).metadata
            end = meta.num_row_groups if r.end is None else r.end
            return sum(meta.row_group(g).num_rows for g in range(r.start, end))
        return sum(1 for _, _, text in _records(r, f) if text is not None)


def plan_records(plan: list[ReadRange], storage_options: dict | None = None,
                 block_records: int = 1 << 14) -> Iterator[tuple[int, int, int, bytes]]:
    """Every record of ``plan`` in input order as ``(file, line, element, raw bytes)``, its line
    the file's (``Origins``), read in this process without Ray: what the read stage hands on,
    for checks and benchmarks."""
    urls = {r.file: r.url for r in plan}
    origins = Origins([urls.get(i, "") for i in range(max(urls, default=-1) + 1)],
                      [r.pass_key for r in plan])
    for task, r in enumerate(plan):
        for block in read_range(r, task, storage_options, block_records):
            for line, element, text in zip(*(block[c].to_pylist()
                                              for c in ("line", "element", "text"))):
                origins.enter(task)
                if text is None:
                    origins.end(task, line)
                else:
                    where = origins.locate(r.file, line, element)
                    yield r.file, where.get("line", where.get("row")), element, text
    origins.finish()


def record_table(task: int, file: int, rows: list[tuple[int, int, bytes | None]]) -> pa.Table:
    """Read-stage rows of one task from ``(line, element, text)``; text None: the end row."""
    lines, elements, texts = zip(*rows) if rows else ((), (), ())
    n = len(rows)
    return pa.table([pa.array([task] * n, pa.int32()), pa.array([file] * n, pa.int32()),
                     pa.array(lines, pa.int64()), pa.array(elements, pa.int32()),
                     pa.array(texts, pa.binary())], schema=SCHEMA)


def iter_records(f: BinaryIO, is_array_file: bool, chunk_size: int = _CHUNK, start: int = 0,
                 end: int | None = None, element: int = 0
                 ) -> Iterator[tuple[int, int, bytes | None]]:
    """``(line, element, raw bytes)`` of every record in an open binary stream, then the end
    row ``(lines read, -1, None)``. With ``end``: only the lines starting in bytes
    ``[start, end)``, numbered from that range's first line; in an array file, the elements
    of that range (``_array_runs``), the first numbered ``element``."""
    inside = is_array_file and start > 0  # an array range after the first: no ``[`` to find
    if inside:
        f.seek(start)
        head = f.read(chunk_size)
    elif start:
        head, start = _skip_partial_line(f, start, chunk_size)
    else:
        head = _head(f, chunk_size)
    limit = None if end is None else end - start
    if inside or is_array_file and head.lstrip(_LEADING)[:1] == b"[":
        yield from _array_elements(head, f, chunk_size, limit, element, inside)
    else:
        yield from _lines(head, f, chunk_size, limit, file_start=start == 0)


def _head(f: BinaryIO, chunk_size: int) -> bytes:
    """The stream's first bytes, up to the first one that tells the kind (``[`` or not)."""
    head = f.read(chunk_size)
    while head and not head.lstrip(_LEADING):
        more = f.read(chunk_size)
        if not more:
            break
        head += more
    return head


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


# From a position: past complete strings and other bytes, to the next structural byte (group 1)
# or a lone quote (a string cut by the buffer's end). Possessive, anchored (``match``): linear.
_NEXT = re.compile(rb'(?:[^"\[\]{},]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+([\[\]{},"])')


def _array_elements(head: bytes, f: BinaryIO, chunk_size: int, limit: int | None = None,
                    first: int = 0, inside: bool = False
                    ) -> Iterator[tuple[int, int, bytes | None]]:
    """``_array_scan`` without the byte offsets: the reader's rows."""
    for line, element, text, _ in _array_scan(head, f, chunk_size, limit, first, inside):
        yield line, element, text


def _array_scan(head: bytes, f: BinaryIO, chunk_size: int, limit: int | None = None,
                first: int = 0, inside: bool = False
                ) -> Iterator[tuple[int, int, bytes | None, int | None]]:
    """Split a top-level JSON array into its elements' raw bytes without parsing them:
    ``(line, index in the array, bytes, offset past the comma after it)`` (offset None after
    the last), then the end row ``(lines read, -1, None, None)``. ``inside``: the stream starts
    just after a top-level comma (a range of ``_array_runs``), its first element numbered
    ``first``; ``limit``: stop after the top-level comma ending at that offset. Lines and
    offsets count from the stream's start.

    An array cut short (a truncated file) yields its last element behind a ``[``, so the parser
    rejects it as truncated with its line (a number cut short would parse) instead of the whole
    file being lost.
    """
    buf = head
    pos = 0 if inside else buf.index(b"[") + 1
    start, depth, index, base = pos, 1, first, 0  # base: the stream offset of buf[0]
    counted_pos, counted_line = 0, 1  # the line number at buf[counted_pos]
    eof = False

    def line_at(p: int) -> int:
        nonlocal counted_pos, counted_line
        counted_line += buf.count(b"\n", counted_pos, p)
        counted_pos = p
        return counted_line

    def element(end: int, after: int | None) -> tuple[int, int, bytes, int | None] | None:
        nonlocal index
        raw = buf[start:end]
        text = raw.strip()
        if not text:
            return None
        index += 1
        return line_at(start + (len(raw) - len(raw.lstrip()))), index - 1, text, after

    while True:
        m = _NEXT.match(buf, pos)
        if m is None or m.group(1) == b'"':
            if eof:
                item = element(len(buf), None)
                if item:
                    yield item[0], item[1], b"[" + item[2], None
                break
            chunk = f.read(chunk_size)
            eof = not chunk
            # Drop what is consumed; keep the current element and the line count consistent.
            line_at(start)
            buf, pos, counted_pos, base = buf[start:] + chunk, pos - start, 0, base + start
            start = 0
            continue
        tok = m.group(1)
        pos = m.end()
        if tok in (b"{", b"["):
            depth += 1
        elif tok in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                item = element(m.start(1), None)
                if item:
                    yield item
                break
        elif tok == b"," and depth == 1:
            item = element(m.start(1), base + pos)
            if item:
                yield item
            start = pos
            if limit is not None and base + pos >= limit:
                break
    # Lines up to where the scan stopped: a range's share, which ``Origins`` adds up.
    yield line_at(min(pos, len(buf))) - 1, -1, None, None


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


# -- selection: which records of a source a pass keeps ------------------------------------------

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fixed bijection of uint64 that scrambles every bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def source_name(path: str) -> str:
    """What keys a source's selection: the last component of its path as written (a file name,
    a directory's name, a glob), so the same data in another directory, on a mount or in a
    bucket selects the same records."""
    return posixpath.basename(path.rstrip("/"))


def source_key(seed: int, name: str) -> tuple[int, ...]:
    """The permutation's round keys for a source: a function of the seed and the source's name
    only (so reordering sources, or changing N, keeps each record's rank)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8 * _ROUNDS).digest()
    return tuple(int.from_bytes(digest[8 * i:8 * i + 8], "little") for i in range(_ROUNDS))


def permute(positions: np.ndarray, key: tuple[int, ...], total: int) -> np.ndarray:
    """A keyed bijection of ``[0, total)``, vectorized: a balanced Feistel network on the
    smallest even number of bits covering ``total``, cycle-walked back into range (O(1)
    memory: no table of ``total`` entries)."""
    bits = max(2, (int(total) - 1).bit_length())
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(k) for k in key]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    y = once(np.asarray(positions, dtype=np.uint64))
    out_of_range = y >= np.uint64(total)
    while out_of_range.any():
        y[out_of_range] = once(y[out_of_range])
        out_of_range = y >= np.uint64(total)
    return y


@dataclass(frozen=True)
class Selection:
    """A partial pass's choice within one read task: the source holds ``total`` records, the
    task's are positions ``first .. first + count - 1``, and position ``r`` is kept iff
    ``permute(r) < keep``."""

    key: tuple[int, ...]
    total: int
    keep: int
    first: int
    count: int

    def mask(self, n: int, offset: int = 0) -> np.ndarray:
        start = self.first + offset
        return permute(np.arange(start, start + n, dtype=np.uint64), self.key,
                       self.total) < np.uint64(self.keep)

    def filter(self, items: Iterator[tuple[int, int, bytes | None]], url: str,
               chunk: int = 4096) -> Iterator[tuple[int, int, bytes | None]]:
        """The selected records of ``items``, then its end row; the task must read exactly the
        ``count`` records the counting pass found (else the file changed in between)."""
        seen, buf = 0, []

        def flush():
            nonlocal seen, buf
            keep = self.mask(len(buf), seen)
            seen += len(buf)
            out, buf = [item for item, k in zip(buf, keep) if k], []
            return out

        for item in items:
            if item[2] is not None:
                buf.append(item)
                if len(buf) >= chunk:
                    yield from flush()
                continue
            yield from flush()
            if seen != self.count:
                raise InputError(f"{url} changed while it was read: the counting pass found "
                                 f"{self.count} records in a range, the read {seen}")
            yield item


def passes(source: Source, total: int | None) -> list[int | None]:
    """What each pass over a source keeps: None for a whole copy, else a count of its ``total``
    records (the last pass). ``samples: N``: N // M whole copies and N % M more; ``fraction: f``:
    as samples of round(f * M); ``repeat: k``: k whole copies."""
    if source.repeat is not None:
        return [None] * source.repeat
    if not source.counted:
        return [None]
    n = source.samples if source.samples is not None else math.floor(source.fraction * total
                                                                        + 0.5)
    if n and not total:
        raise InputError(f"input {source.spec!r}: the source has no records to take {n} from")
    whole, rest = divmod(n, total) if total else (0, 0)
    return [None] * whole + ([rest] if rest else [])


def mixture_plan(plan: list[ReadRange], sources: list[Source], counts: dict[int, int],
                 seed: int) -> list[ReadRange]:
    """The read tasks of every pass over every source, in rounds: round ``c`` holds pass ``c``
    of each source that has one, in ``plan``'s order. ``counts``: the records of each range of
    ``plan`` (by index) of the counted sources."""
    totals = {k: sum(counts[i] for i, r in enumerate(plan) if r.source == k)
              for k, s in enumerate(sources) if s.counted}
    before, firsts = {}, {}  # records of a source before each of its ranges
    for i, r in enumerate(plan):
        if r.source in totals:
            firsts[i] = before.get(r.source, 0)
            before[r.source] = firsts[i] + counts[i]
    keeps = [passes(s, totals.get(k)) for k, s in enumerate(sources)]
    keys = [source_key(seed, source_name(s.path)) for s in sources]
    out = []
    for copy in range(max((len(k) for k in keeps), default=0)):
        for i, r in enumerate(plan):
            if copy >= len(keeps[r.source]):
                continue
            keep = keeps[r.source][copy]
            select = None if keep is None else Selection(keys[r.source], totals[r.source], keep,
                                                         firsts[i], counts[i])
            out.append(replace(r, copy=copy, select=select))
    return out


class Origins:
    """True positions of records, for a consumer that sees the read rows in input order.

    A read task numbers lines from the start of its range; its end row says how many it read.
    The file's earlier tasks' counts, added up as their end rows pass, turn a range's line into
    the file's line. The same bookkeeping checks that every task arrives whole and in order:
    a task's rows may only follow the previous task's end row, and ``finish`` wants them all.
    """

    def __init__(self, files: list[str], task_files: list,
                 tasks: tuple[int, int] | None = None):
        """``task_files``: what each read task's lines count from, its file (index) or its
        ``ReadRange.pass_key`` (a file read again for another copy counts from its start).
        ``tasks``: the first and last task expected (a shard's; default: all)."""
        self.files = files
        self.task_files = task_files
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
