"""The ordered stage: samples in input order → packed documents → ``.bin/.idx``, atomically.

``SFTWriter`` is a plain class (unit-tested without Ray); the pipeline runs one of it per shard
as a Ray actor and feeds it the tokenizer stage's blocks in input order. It checks that order
(and, through ``sources.Origins``, that every read task arrived whole, which also gives each
record its true line), rebuilds each record's group, packs, checks every document against the
contract (``idxmap.check_rows``) just before writing it, reports every record it does not
write, and at the end checks the index and the file sizes before the files get their final
names. Checking the documents in memory, not by reading the ``.bin`` back, keeps the check off
the end of the run.

Atomicity: the files themselves (temporary names, the streamed ``.bin``, the publish order,
abort) are ``outputs.OutputFiles``; the writer decides what goes in them and when they are
sealed, published or aborted.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftprep import idxmap, trainer
from sftprep.budget import Phases, seconds
from sftprep.errors import Error
from sftprep.idxmap import MANIFEST
from sftprep.outputs import REJECTS, OutputFiles
from sftprep.packing import BestFitPacker, Document, Piece, make_packer
from sftprep.shards import TASK_COLUMN, assemble_manifest, derive_figures, merge_figures, task_reach
from sftprep.sources import Origins, ReadRange, describe
from sftprep.tokenize import (CUT_KEYS, CUTS, DROPPED, END, OK, OVERLONG, PHASES, REASONING,
                              REJECTED, SCHEMA, labels, trained_tokens)

# Counters the summary gives as they are (docs/trainer.md): samples written shorter and the
# tokens they lost, in all and per cut; samples ``--overlong drop`` dropped and their tokens;
# reasoning texts carried, not in their rendered turn, and given their own sample.
FIGURES = ("cut_samples", "tokens_lost",
           *(f"{CUT_KEYS[c]}_{x}" for c in CUTS for x in ("samples", "tokens_lost")),
           "overlong_dropped", "overlong_dropped_tokens",
           *(f"reasoning_{name}" for name in REASONING))


# The stage's columns the writer reads row by row (the token columns it reads as arrays).
ROW_COLUMNS = [n for n in SCHEMA.names if n not in ("input_ids", "trained", "cpu_ns")]
# The writer's CPU, per phase: the block's rows read (columns, labels, groups), documents
# packed, their rows assembled, checked (``idxmap.check_rows``, ``trainer.check_rows``) and
# written, and the end (flush, index, checks).
WRITER_PHASES = ("rows_in", "pack", "rows_out", "check", "write", "seal")


class BadRecordError(Error, ValueError):
    """A bad input record under ``--on-error fail``; names the file, line and what is wrong."""


class Reports:
    """The one rule for records not written (the build's rejects file, the stats job's bad
    records): a rejected record stops the run under ``fail``, naming its file and line; else it
    is listed, one JSON line, in ``path`` (opened when the first arrives)."""

    def __init__(self, path: str | None, on_error: str, fix: str):
        """``path`` None: nothing is listed. ``fix``: what the error message suggests besides
        fixing the record."""
        self.path, self.on_error, self.fix = path, on_error, fix
        self._file = None

    def add(self, entry: dict) -> None:
        """``entry``: the record's place (``Origins.locate``), ``status``, ``reason``, ``detail``
        and anything more to list."""
        if entry.get("status", REJECTED) == REJECTED and self.on_error == "fail":
            raise BadRecordError(f"{describe(entry)}: {entry['reason']}: {entry['detail']}\n"
                                 f"(fix the record, or run with --on-error skip {self.fix})")
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    @property
    def written(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


def source_figures(c: Counter, reasons: dict[str, Counter]) -> dict:
    """The figures the writer counts, from one source's counters (the summary's totals are
    these summed over sources, ``shards.merge_figures``): a new counter added here is reported
    per source and in total alike."""
    return {
        "records_read": c["records_read"],
        "records": c["records"],
        "samples_in": c["samples"] + c[DROPPED],
        "samples_written": c["samples"],
        "rejected_records": c[REJECTED],
        "rejected_by_reason": dict(sorted(reasons[REJECTED].items())),
        "dropped_samples": c[DROPPED],
        "dropped_by_reason": dict(sorted(reasons[DROPPED].items())),
        **{k: c[k] for k in FIGURES},
        "tokens": c["tokens"],
        "trained_tokens": c["trained"],
    }


class SFTWriter:
    def __init__(self, document_prefix: str, files: list[str], seq_length: int, pad_id: int,
                 packing: str = "none", pack_window: int = 2000, on_error: str = "fail",
                 storage_options: dict | None = None, spill_dir: str | None = None,
                 vocab_size: int | None = None, plan: list[ReadRange] | None = None,
                 trainer_safe: bool = False, owns: tuple[int, int] | None = None,
                 sources: list[str] | None = None):
        """``plan``: every read task (default: one task per file, all of it, source 0).
        ``owns``: the first and last read task of this shard's rows (``shards``; None: all);
        the end rows of its first file's earlier tasks are kept too (true line numbers).
        ``sources``: how each source is named in the summary."""
        plan = plan or [ReadRange(i, url) for i, url in enumerate(files)]
        task_files = [r.pass_key for r in plan]
        self.owns = owns
        self.reach = task_reach(task_files, [owns])[0] if owns else None
        self.origins = Origins(files, task_files, self.reach)
        self.task_source = [r.source for r in plan]
        # The identity of a record, the same for all its copies (``packing.Piece.record``): the
        # file (by URL, whichever source named it), the range it was read in and its place there.
        urls = {url: k for k, url in enumerate(dict.fromkeys(files))}
        self.task_record = [(urls[files[r.file]], r.start) for r in plan]
        lo, hi = owns or (0, len(plan) - 1)
        self.partial_reads = [(r.source, r.select.count) for r in plan[lo:hi + 1] if r.select]
        self.whole = [r.select is None for r in plan]
        self.sources = sources or ["input"]
        self.S = seq_length
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.trainer_safe = trainer_safe
        self.trainer = trainer.figures()  # what each trainer mode would meet, per document
        self.on_error = on_error
        self.packer = make_packer(packing, seq_length, pack_window)
        # Without packing, what bfd would have made of the same samples, on their lengths alone
        # (memory: one window of lengths): the summary's advice when most slots are padding.
        self._bfd = BestFitPacker(seq_length, pack_window) if packing == "none" else None
        self.bfd_documents = 0
        self.written_tokens = 0
        self.files = OutputFiles(document_prefix, storage_options, spill_dir)
        self._rejects = Reports(self.files.tmp + REJECTS, on_error,
                                f"to write the good records and list the bad ones in "
                                f"{os.path.basename(document_prefix)}{REJECTS}")
        self.index = idxmap.IndexedWriter(self.files.bin)
        self._last_key = (-1, -1, -1, -1)
        self._group_key: tuple[int, int, int] | None = None
        self._group: list[Piece] = []
        self._closed: list[list[Piece]] = []  # whole groups not packed yet
        self._pending_docs: list[Document] = []
        # Every counter is kept per source: ``self.c`` and ``self.reasons`` are the current
        # row's source's (``_use_source``).
        self.counts = [Counter() for _ in self.sources]
        self.by_reason = [{REJECTED: Counter(), DROPPED: Counter()} for _ in self.sources]
        self._use_source(0)
        self.max_samples_per_doc = 0
        self.checked = {"samples": 0, "tokens": 0, "pad": 0}  # what check_rows saw
        self._rows = np.empty((0, 2 * seq_length), dtype=np.int32)  # reused: no page faults
        self.started = time.time()
        self.write_seconds = 0.0
        self.stage_cpu = np.zeros(len(PHASES), np.int64)  # the tokenizer stage's, from cpu_ns
        self.cpu = Phases(WRITER_PHASES)                  # this writer's thread

    # -- consuming ---------------------------------------------------------------------------

    def _use_source(self, source: int) -> None:
        self.c, self.reasons = self.counts[source], self.by_reason[source]

    def consume(self, table: pa.Table) -> dict:
        """Take one block of the tokenizer stage's output (``tokenize.SCHEMA`` rows, in input
        order)."""
        t0 = time.perf_counter()
        self.cpu.restart()
        if not table.schema.equals(SCHEMA):
            raise RuntimeError(f"the tokenizer stage sent {table.schema}, not its SCHEMA")
        cpu = table["cpu_ns"]
        if self.owns is not None:  # a block may also hold other shards' rows
            tasks = table[TASK_COLUMN]
            lo, hi = self.owns
            mine = pc.and_(pc.greater_equal(tasks, lo), pc.less_equal(tasks, hi))
            ends = pc.and_(pc.equal(table["status"], END),
                           pc.and_(pc.greater_equal(tasks, self.reach[0]), pc.less(tasks, lo)))
            cpu = cpu.filter(mine)
            table = table.filter(pc.or_(mine, ends))
        stage_cpu = pc.list_flatten(cpu).to_numpy()
        self.stage_cpu += stage_cpu.reshape(-1, len(PHASES)).sum(0, dtype=np.int64)
        ids_col, trained_col = (table[n].combine_chunks() for n in ("input_ids", "trained"))
        ids_values = ids_col.values.to_numpy()
        labels_values = labels(ids_col, trained_col)
        offsets = ids_col.offsets.to_numpy()
        trained = trained_tokens(trained_col)
        cols = {n: table[n].to_pylist() for n in ROW_COLUMNS}
        for i in range(table.num_rows):
            key = (cols["task"][i], cols["line"][i], cols["element"][i], cols["sample"][i])
            status = cols["status"][i]
            if status == END:
                self.origins.end(key[0], key[1])
                continue
            if key <= self._last_key:
                raise RuntimeError(f"records arrived out of order: {key} after {self._last_key}; "
                                   "the ordered stage needs preserve_order")
            self.origins.enter(key[0])
            self._last_key = key
            if key[:3] != self._group_key:
                self._close_group()
                self._group_key = key[:3]
                self._use_source(self.task_source[key[0]])
                self.c["records"] += 1
                self.c["records_read"] += self.whole[key[0]]
            if cols["reasoning"][i]:
                for name, n in zip(REASONING, cols["reasoning"][i]):
                    self.c[f"reasoning_{name}"] += n
            if status == OK:
                a, b = offsets[i], offsets[i + 1]
                self._group.append(Piece(
                    int(b - a), (ids_values[a:b], labels_values[a:b], self.task_source[key[0]],
                                 int(trained[i])),
                    (*self.task_record[key[0]], key[1], key[2])))
                self.c["samples"] += 1
                if cols["lost"][i]:  # written shorter than it renders
                    self._cut({n: cols[n][i] for n in cols}, int(b - a))
            else:
                self._problem(status, {n: cols[n][i] for n in cols})
        self.cpu.lap("rows_in")
        self._pack_closed()
        self.cpu.lap("pack")
        self._write_pending()
        self.write_seconds += time.perf_counter() - t0
        reply = self.progress()
        upload = self.files.upload()
        if upload:  # the driver aborts it if this writer is lost
            reply["upload"] = upload
        return reply

    def _problem(self, status: str, row: dict) -> None:
        where = self.origins.locate(row["file"], row["line"], row["element"])
        entry = {**where, "status": status, "reason": row["reason"], "detail": row["detail"],
                 "text": row["text"]}
        if row["sample"] >= 0:
            entry["sample"] = row["sample"]
        if row["tokens"] is not None:
            entry["tokens"] = row["tokens"]
        self._rejects.add(entry)
        self.c[status] += 1
        self.reasons[status][row["reason"]] += 1
        if row["reason"] == OVERLONG:
            self.c["overlong_dropped"] += 1
            self.c["overlong_dropped_tokens"] += row["tokens"]

    def _cut(self, row: dict, kept: int) -> None:
        """A sample written shorter than it renders: counted per cut and listed with the
        tokens it lost to each (``tokenize.CUTS``)."""
        lost = {c: n for c, n in zip(CUTS, row["lost"]) if n}
        self.c["cut_samples"] += 1
        self.c["tokens_lost"] += sum(lost.values())
        for c, n in lost.items():
            self.c[f"{CUT_KEYS[c]}_samples"] += 1
            self.c[f"{CUT_KEYS[c]}_tokens_lost"] += n
        self._rejects.add({**self.origins.locate(row["file"], row["line"], row["element"]),
                           "sample": row["sample"], "status": "cut", "reason": row["reason"],
                           "tokens": row["tokens"], "kept": kept, "lost": lost,
                           "detail": row["detail"]})

    def _close_group(self) -> None:
        if self._group:
            self._closed.append(self._group)
        self._group = []

    def _pack_closed(self) -> None:
        """Pack the groups closed since the last call, in order (once per block: the packer
        sees the same sequence as group by group)."""
        for group in self._closed:
            self._pending_docs.extend(self.packer.add(group))
            if self._bfd is not None:
                self.bfd_documents += _count(self._bfd.add([Piece(p.length) for p in group]))
        self._closed = []

    def _write_pending(self) -> None:
        docs, self._pending_docs = self._pending_docs, []
        if not docs:
            return
        S = self.S
        if len(self._rows) < len(docs):
            self._rows = np.empty((len(docs), 2 * S), dtype=np.int32)
        rows = self._rows[:len(docs)]
        rows[:, :S] = self.pad_id
        rows[:, S:] = idxmap.IGNORE_INDEX
        for r, doc in enumerate(docs):
            at = 0
            for piece in doc:
                ids, labels, source, trained = piece.payload
                rows[r, at:at + piece.length] = ids
                rows[r, S + at:S + at + piece.length] = labels
                at += piece.length
                self.counts[source]["tokens"] += piece.length
                self.counts[source]["trained"] += trained
            self.written_tokens += at
            self.max_samples_per_doc = max(self.max_samples_per_doc, len(doc))
        self.cpu.lap("rows_out")
        idxmap.check_rows(self.index.documents, rows, S, self.pad_id, self.vocab_size,
                          self.checked)
        trainer.check_rows(self.index.documents, rows, S, self.trainer)
        if self.trainer_safe and trainer.verdict(self.trainer)["packed"]:
            raise RuntimeError("template.trainer_safe: a document the packed trainer cannot read "
                               f"would be written: {trainer.verdict(self.trainer)['packed']}")
        self.cpu.lap("check")
        self.index.add_documents(rows)
        self.cpu.lap("write")

    def progress(self) -> dict:
        return {"records": sum(c["records"] for c in self.counts),
                "samples": sum(c["samples"] for c in self.counts),
                "documents": self.index.documents, "tokens": self.written_tokens,
                "read_tasks": self._tasks_done()}

    def _tasks_done(self) -> int:
        """Read tasks of this writer's range whose end row has passed (summed over shards:
        all the build's)."""
        o = self.origins
        lo, hi = self.owns or (0, len(o.task_files) - 1)
        last = o.task if o.ended else o.task - 1
        return max(0, min(hi, last) - lo + 1)

    # -- finishing ---------------------------------------------------------------------------

    def finish(self, manifest_extra: dict[str, Any], train: dict | None = None) -> dict:
        """Flush, write the index, verify, publish atomically; return the manifest (the
        pipeline's own, ``shards.assemble_manifest``, for a writer used alone). ``train``:
        ``trainer.section``'s epochs and global batch size."""
        summary = self.seal(manifest_extra.get("elapsed_seconds"))
        prefix = self.files.prefix
        manifest = assemble_manifest(manifest_extra, [summary], [self.trainer], [prefix],
                                     [self.outputs()], self.S, prefix, train)
        with open(self.files.tmp + MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
        self.publish()
        return manifest

    def seal(self, elapsed: float | None = None) -> dict:
        """Flush, write the index, check it against the .bin's size; return the summary.
        Nothing is published yet (``publish``)."""
        t0 = time.perf_counter()
        self.cpu.restart()
        self.origins.finish()
        self._close_group()
        self._pack_closed()
        self._pending_docs.extend(self.packer.flush())
        if self._bfd is not None:
            self.bfd_documents += _count(self._bfd.flush())
        self.cpu.lap("pack")
        self._write_pending()
        bin_bytes = self.files.seal_bin()
        with open(self.files.tmp + ".idx", "wb") as f:
            self.index.write_index(f)
        self._rejects.close()
        for source, count in self.partial_reads:  # the records a selection passed over
            self.counts[source]["records_read"] += count
        self.write_seconds += time.perf_counter() - t0
        idxmap.check_index(idxmap.read_index(self.files.tmp + ".idx"), bin_bytes, self.S)
        self.cpu.lap("seal")
        summary = self.summary()
        if elapsed:
            summary["elapsed_seconds"] = elapsed
            summary["tokens_per_second"] = round(summary["tokens"] / elapsed)
        if (self.checked["tokens"], self.checked["samples"]) != (summary["tokens"],
                                                                   summary["samples_written"]):
            raise RuntimeError(f"the checked documents disagree with the writer's counts: "
                               f"{self.checked} against {summary}")
        return summary

    def trainer_figures(self) -> dict:
        """What each trainer mode meets in this output's documents (``trainer.figures``)."""
        return self.trainer

    def outputs(self) -> dict[str, str]:
        return self.files.outputs(self._rejects.written)

    def summary(self) -> dict:
        """The counted figures in total and per source (``sources``), the documents' figures,
        and the ratios ``shards.derive_figures`` computes from them."""
        per_source = [source_figures(c, r) for c, r in zip(self.counts, self.by_reason)]
        return derive_figures({
            **merge_figures(per_source),
            "trainer_safe": self.trainer_safe,
            "documents": self.index.documents,
            "seq_length": self.S,
            "samples_per_document_max": self.max_samples_per_doc,
            "writer_seconds": round(self.write_seconds, 3),
            "cpu_seconds": {"tokenize": seconds(PHASES, self.stage_cpu),
                            "writer": self.cpu.seconds()},
            **({"bfd_documents": self.bfd_documents} if self._bfd is not None else {}),
            "sources": [{"source": name, **f} for name, f in zip(self.sources, per_source)],
        })

    def publish(self) -> None:
        """Give the sealed files their final names (``outputs.OutputFiles.publish``)."""
        self.files.publish(self._rejects.written)

    def abort(self) -> None:
        """Delete every temporary file and abort the .bin's multipart upload; a failed run
        leaves nothing that looks like output."""
        self._rejects.close()
        self.files.abort()

    def leftovers(self) -> tuple[int, list[str]]:
        """This writer's process id and its files' ``temporary_paths``: the writer runs on the
        driver's node, so when the local runtime is lost under both, the driver stops it and
        deletes them itself."""
        return os.getpid(), self.files.temporary_paths()


def _count(documents) -> int:
    return sum(1 for _ in documents)
