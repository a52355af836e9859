"""Reading: expand inputs to files and stream their records as raw bytes with their origin.

Records are not parsed here. A read task streams one file and yields blocks of
``(file, line, text)`` rows: ``file`` is the input's index in the expanded, sorted file list,
``line`` the 1-based line where the record starts, ``text`` its raw bytes. ``(file, line)`` is the
global order key. Broken bytes travel on unchanged, so the tokenizer stage can reject them with
their origin instead of a read task failing the whole file.

``.jsonl`` files hold one record a line (blank lines are skipped). ``.json`` files hold one JSON
array whose elements are split out by a streaming scanner, so neither kind is ever held whole in
memory; a ``.json`` file that does not start with ``[`` is read as JSON Lines. ``.gz`` is
decompressed on the fly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import pyarrow as pa

from sftprep.storage import filesystem

EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SCHEMA = pa.schema([("file", pa.int32()), ("line", pa.int64()), ("text", pa.binary())])
_CHUNK = 1 << 20


class InputError(ValueError):
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


def read_records(url: str, storage_options: dict | None, file_index: int,
                 block_records: int) -> Iterator[pa.Table]:
    """Stream one file as Arrow tables of at most ``block_records`` rows (the read task body)."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb", compression="infer") as f:
        lines: list[int] = []
        texts: list[bytes] = []
        for line, text in iter_records(f, is_array_file=url.endswith((".json", ".json.gz"))):
            lines.append(line)
            texts.append(text)
            if len(lines) >= block_records:
                yield _table(file_index, lines, texts)
                lines, texts = [], []
        if lines:
            yield _table(file_index, lines, texts)


def _table(file_index: int, lines: list[int], texts: list[bytes]) -> pa.Table:
    return pa.table([pa.array([file_index] * len(lines), pa.int32()),
                     pa.array(lines, pa.int64()), pa.array(texts, pa.binary())], schema=SCHEMA)


def iter_records(f: BinaryIO, is_array_file: bool,
                 chunk_size: int = _CHUNK) -> Iterator[tuple[int, bytes]]:
    """``(line, raw bytes)`` of every record in an open binary stream."""
    head = f.read(chunk_size)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if is_array_file and first == b"[":
        yield from _array_elements(head, f, chunk_size)
    else:
        yield from _lines(head, f, chunk_size)


def _lines(head: bytes, f: BinaryIO, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    number, pending, chunk = 0, [], head
    while chunk:
        parts = chunk.split(b"\n")
        if len(parts) > 1:
            parts[0] = b"".join(pending) + parts[0]
            pending = []
            for part in parts[:-1]:
                number += 1
                if part.strip():
                    yield number, part.rstrip(b"\r")
        pending.append(parts[-1])
        chunk = f.read(chunk_size)
    last = b"".join(pending)
    if last.strip():
        yield number + 1, last.rstrip(b"\r")


# A complete JSON string, a lone quote (a string cut by the chunk end), or a structural byte.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|"|[\[\]{},]')


def _array_elements(head: bytes, f: BinaryIO, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """Split a top-level JSON array into its elements' raw bytes without parsing them.

    An array cut short (a truncated file) yields its last partial element as it is, so the
    parser rejects it with its line instead of the whole file being lost.
    """
    buf = head
    pos = buf.index(b"[") + 1
    start, depth = pos, 1
    counted_pos, counted_line = 0, 1  # the line number at buf[counted_pos]
    eof = False

    def line_at(p: int) -> int:
        nonlocal counted_pos, counted_line
        counted_line += buf.count(b"\n", counted_pos, p)
        counted_pos = p
        return counted_line

    def element(end: int) -> tuple[int, bytes] | None:
        raw = buf[start:end]
        text = raw.strip()
        if not text:
            return None
        return line_at(start + (len(raw) - len(raw.lstrip()))), text

    while True:
        m = _TOKENS.search(buf, pos)
        if m is None or m.group() == b'"':
            if eof:
                item = element(len(buf))
                if item:
                    yield item
                return
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
                return
        elif tok == b"," and depth == 1:
            item = element(m.start())
            if item:
                yield item
            start = pos
