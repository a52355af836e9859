"""The tokenizer stage: raw records in, one row per sample out (ids, labels, or why not).

Runs in ``map_batches`` on an actor pool: each actor gets the tokenizer ready-made from the
driver (``encode.Setup``: no transformers import, no tokenizer directory to load); ``__call__``
parses a batch of records, renders every conversation, and encodes all of them at once with the
fast path or the HF tokenizer (``encode``). Rows keep their record's origin (the read rows'
``ORIGIN`` columns) and the sample's index within its record, so the ordered stage can rebuild
groups and report problems; a read task's end row is passed on as a row of status ``end``.

Guard: with the fast path, a deterministic subset of samples is encoded by the HF tokenizer as
well (every sample of an actor's first batch and of the first ``GUARD_LINES`` lines of every
file, then one in ``GUARD_EVERY`` by its file and line, a split file's parts each counting
lines from their start), and any difference in ids or trained spans
stops the build with the sample's file and line and both results. With traced rendering
(``trace``), the same samples are rendered by plain Jinja too, and a different text or trained
span stops the build the same way (so does a record only one of the two rejects).

Per sample, with ``L`` tokens and trained spans from the template (contract, "One sample"):
``labels[t] = ids[t+1]`` where token ``t+1`` is trained, else ``-100``; ``labels[L-1] = -100``;
the last input becomes ``-1 - id`` (the sample boundary). Samples longer than ``S`` are cut to
``S`` first; a sample with no trained token inside the first ``S`` (the prompt alone fills the
window) is dropped, which is the reference's rule ``len(prompt_ids) >= S``. The labels are a
function of the ids and the trained token ranges, so only those travel (``trained``: half the
bytes of a labels column); the writer makes the labels of a whole block at once (``labels``).

Every output row is one ``SCHEMA`` row, the contract the writer and the stats job read. The
stage's CPU time per phase (``PHASES``) rides on each output block's first row (``cpu_ns``), so
the writer can give the build's CPU budget (``budget``) without a helper actor.

``trainer_safe`` (the default) adds the cuts Pai-Megatron-Patch's trainer needs (docs/trainer.md):
a sample keeps at most ``S - 1`` tokens, so a document holding it alone keeps a pad slot (packed
training fails on a row whose only sample fills all ``S`` inputs), and a sample never ends on
token id 0 (its boundary ``-1 - 0 = -1`` is Megatron ``GPTDataset``'s pad sentinel, rewritten to
0, so the boundary would vanish): one more token is cut instead.

A written sample that lost tokens says how many to each cut (``lost``, in ``CUTS`` order: at
``S``, the pad slot, a trailing id 0), so the writer reports what happened, not one label for
all. ``overlong: drop`` drops a sample longer than a document holds (``S``, ``S - 1`` with
``trainer_safe``) instead of cutting it (reason ``overlong``). ``reasoning`` counts the
sample's reasoning texts as ``template.Rendered`` does (carried, not rendered, split off).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftprep.budget import Phases
from sftprep.config import TemplateConfig
from sftprep.encode import Setup, encoder, prepare
from sftprep.errors import Error
from sftprep.idxmap import IGNORE_INDEX
from sftprep.records import RecordError, parse_group
from sftprep.sources import ORIGIN
from sftprep.sources import SCHEMA as RECORD_SCHEMA
from sftprep.template import ChatRenderer, TemplateError, load_tokenizer

OK, REJECTED, DROPPED, END = "ok", "rejected", "dropped", "end"
# What a written sample can lose, in the order of the stage's ``lost`` column; the summary's keys
# are ``<key>_samples`` and ``<key>_tokens_lost`` (docs/trainer.md).
CUT_TRUNCATED, CUT_PAD_SLOT, CUT_ID_0 = "truncated at S", "pad slot", "ends on id 0"
CUTS = (CUT_TRUNCATED, CUT_PAD_SLOT, CUT_ID_0)
CUT_KEYS = {CUT_TRUNCATED: "truncated", CUT_PAD_SLOT: "pad_slot", CUT_ID_0: "id_0"}
CUT_DETAIL = {CUT_TRUNCATED: "longer than seq-length {S}",
              CUT_PAD_SLOT: "trainer-safe: at most {S}-1 tokens, so a document holding it alone "
                            "keeps a pad slot",
              CUT_ID_0: "trainer-safe: it ended on token id 0, whose boundary -1 GPTDataset "
                        "erases"}
OVERLONG = "overlong"  # the reason of a sample --overlong drop dropped
REASONING = ("carried", "not_rendered", "split")  # the ``reasoning`` column, in this order
REJECT_TEXT_CHARS = 2000
SCHEMA = pa.schema([
    *(RECORD_SCHEMA.field(name) for name in ORIGIN),  # line: the task's line count at its end
    ("sample", pa.int32()),          # index within the record's group; -1: a whole record
    ("status", pa.string()),         # ok | rejected (bad input) | dropped (too long) | end
    ("reason", pa.string()), ("detail", pa.string()), ("text", pa.string()),
    ("tokens", pa.int32()),          # full length before any cut
    ("prompt_tokens", pa.int32()),   # tokens before the first trained one
    ("chars", pa.int32()),           # characters of the sample's message contents
    ("lost", pa.list_(pa.int32())),  # ok rows: tokens lost to each of CUTS; [] when whole
    ("reasoning", pa.list_(pa.int32())),  # reasoning texts, per REASONING; [] when none
    ("input_ids", pa.list_(pa.int32())),  # the boundary as -1 - id: [] when not written
    ("trained", pa.list_(pa.int32())),    # trained token ranges [a0, b0, a1, b1, ...], 1 <= a
    ("cpu_ns", pa.list_(pa.int64())),     # the block's first row: the stage's CPU per PHASES
])
# The stage's CPU, per phase: the actor's setup (the tokenizer and template made ready, counted
# with its first batch), records parsed (``records``), conversations rendered through the chat
# template, texts encoded, the guards' second encoding and rendering, and the rest (cuts, trained
# ranges, the output table).
PHASES = ("setup", "parse", "render", "encode", "guard", "rows")


@dataclass(frozen=True)
class TokenizeSpec:
    """What the stage needs, picklable for the actors: the template section as configured, how
    records are parsed, and the read plan's files and starts (to name a file and line)."""

    template: TemplateConfig
    format: str = "auto"
    columns: tuple = ()
    files: tuple = ()                # input URLs, to name a file in a guard failure
    # Per read task, where its part of the file starts (a byte, or a Parquet row group; 0: the
    # file's start): a row's line counts from there (``sources``), so only a task starting
    # its file holds the file's first lines.
    starts: tuple = ()

    @classmethod
    def of(cls, tokenizer: str, seq_length: int, **options) -> "TokenizeSpec":
        """A spec from options by name, ``TemplateConfig``'s or this class's (tests, benchmarks)."""
        own = {k: options.pop(k) for k in list(options) if k in cls.__dataclass_fields__}
        return cls(TemplateConfig(tokenizer=tokenizer, seq_length=seq_length, **options), **own)


GUARD_LINES = 512
GUARD_EVERY = 1000


class EncodingMismatch(Error, RuntimeError):
    """A fast path (encoding, or traced rendering) and the reference disagree on a sample: the
    build must not go on."""


class Tokenize:
    def __init__(self, spec: TokenizeSpec, setup: Setup | list | None = None):
        """``setup``: made by the driver (a build passes ``[object ref]``); None prepares it
        here (tests, benchmarks)."""
        # One encoding thread per actor: the actors share the node's cores. Set here rather
        # than in a runtime_env, which would keep the actor out of Ray's prestarted workers.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ready = Phases(("setup",))
        self.spec, t = spec, spec.template
        if isinstance(setup, list):
            import ray
            setup = ray.get(setup[0])
        if setup is None:
            setup = prepare(load_tokenizer(t.tokenizer, t.pad_token, t.chat_template), t.backend)
        self.setup = setup
        self.encoder, self.hf = encoder(setup)
        self.render = ChatRenderer(setup, t.train_on, t.train_tool_calls,
                                   traced=setup.renderer == "traced",
                                   reasoning_turns=t.reasoning_turns)
        self.columns = dict(spec.columns)
        self.batches = 0
        ready.lap("setup")
        self.setup_ns = ready.ns["setup"]  # counted with the first batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        cpu = Phases(PHASES)  # this batch's
        cpu.ns["setup"], self.setup_ns = self.setup_ns, 0
        out = _Rows()
        raws = batch["text"].to_pylist()
        parsed = [None if raw is None else self._parse(raw) for raw in raws]  # None: an end row
        cpu.lap("parse")
        todo = []  # in input order: (batch row, sample index, raw text, Rendered, RecordError
        #            or None for a read task's end row)
        for i, (raw, chats) in enumerate(zip(raws, parsed)):
            if raw is None:
                todo.append((i, -1, raw, None))
                continue
            rendered = chats if isinstance(chats, RecordError) else self._render(chats)
            if isinstance(rendered, RecordError):
                todo.append((i, -1, raw, rendered))
            else:
                todo += [(i, k, raw, r) for k, r in enumerate(rendered)]
        samples = [t for t in todo if t[-1] is not None and not isinstance(t[-1], RecordError)]
        cpu.lap("render")
        encoded = self.encoder.encode([r.text for *_, r in samples],
                                      [r.trained for *_, r in samples])
        cpu.lap("encode")
        if self.render.traced:
            self._render_guard(batch, todo)
        if self.encoder is not self.hf:
            self._guard(batch, samples, encoded)
        cpu.lap("guard")
        self.batches += 1
        encodings = iter(encoded)
        for i, k, raw, r in todo:
            if r is None:
                out.end(i)
            elif isinstance(r, RecordError):
                out.problem(i, k, REJECTED, r.reason, r.detail, raw)
            else:
                self._sample(out, i, k, raw, r, *next(encodings))
        table = out.table(batch)
        cpu.lap("rows")
        return _with_cpu(table, list(cpu.ns.values()))

    def _parse(self, raw: bytes) -> list | RecordError:
        """A record's conversations (``records.parse_group``), or why it cannot be used."""
        try:
            return parse_group(raw, self.spec.format, self.columns)
        except RecordError as e:
            return e

    def _render(self, chats: list, traced: bool = True) -> list | RecordError:
        """The conversations' samples rendered (``ChatRenderer.samples``), or why not."""
        try:
            return [r for c in chats for r in self.render.samples(c, traced)]
        except TemplateError as e:
            return RecordError("template", str(e))

    def _picked(self, batch: pa.Table, rows: list) -> list[int]:
        """Which of ``rows`` (``(batch row, sample index, ...)``) the guards check."""
        tasks, files = batch["task"].to_pylist(), batch["file"].to_pylist()
        lines = batch["line"].to_pylist()
        return [j for j, (i, k, *_) in enumerate(rows)
                if not self.batches or (lines[i] <= GUARD_LINES and not self._start(tasks[i]))
                or (files[i] * 1_000_003 + lines[i] * 101 + k) * 2_654_435_761 % 2**32
                % GUARD_EVERY == 0]

    def _start(self, task: int) -> int:
        return self.spec.starts[task] if task < len(self.spec.starts) else 0

    def _where(self, batch: pa.Table, i: int) -> str:
        """``file:line``; in a part of a split file, the line within that part."""
        task, f, line = (batch[c][i].as_py() for c in ("task", "file", "line"))
        url = self.spec.files[f] if f < len(self.spec.files) else f"file {f}"
        start = self._start(task)
        if not start:
            return f"{url}:{line}"
        unit = "row group" if url.endswith(".parquet") else "byte"
        return f"{url}, line {line} of the part from {unit} {start}"

    def _render_guard(self, batch: pa.Table, todo: list) -> None:
        """Render the guarded samples (and records the template rejected) through plain Jinja
        too; stop at the first difference in text, trained spans or rejection."""
        rows = [t for t in todo if t[-1] is not None
                and (not isinstance(t[-1], RecordError) or t[-1].reason == "template")]
        jinja: dict = {}  # batch row -> its record's renders, or the template's error
        made = Counter(t[0] for t in rows if t[1] >= 0)  # samples per record, traced
        for j in self._picked(batch, rows):
            i, k, raw, got = rows[j]
            if i not in jinja:  # a record's samples are rendered together, once
                jinja[i] = self._render(self._parse(raw), traced=False)
            want = jinja[i]
            if not isinstance(want, RecordError):
                want = (want[k] if len(want) == made[i] else
                        RecordError("template", f"{len(want)} samples against {made[i]}"))
            if _outcome(want) != _outcome(got):
                raise EncodingMismatch(
                    f"{self._where(batch, i)} (sample {k}): the traced chat template differs "
                    f"from Jinja (the build stopped; --tokenizer-backend hf renders with Jinja "
                    f"only): jinja {_show(want)}; traced {_show(got)}")

    def _guard(self, batch: pa.Table, samples: list, encoded: list) -> None:
        """Encode the guarded samples through HF too; stop at the first difference."""
        picked = self._picked(batch, samples)
        if not picked:
            return
        checks = self.hf.encode([samples[j][-1].text for j in picked],
                                [samples[j][-1].trained for j in picked])
        for j, (ids, spans) in zip(picked, checks):
            got_ids, got_spans = encoded[j]
            if not np.array_equal(ids, got_ids) or spans != got_spans:
                i, k, _, r = samples[j]
                raise EncodingMismatch(
                    f"{self._where(batch, i)} (sample {k}): the fast tokenizer path differs from "
                    f"the HF tokenizer (the build stopped; --tokenizer-backend hf avoids the fast "
                    f"path): hf ids {ids.tolist()} spans {spans}; fast ids {got_ids.tolist()} "
                    f"spans {got_spans}; text {r.text!r}")

    def _sample(self, out: "_Rows", i, k, raw, rendered, ids, spans) -> None:
        t = self.spec.template
        S, safe = t.seq_length, t.trainer_safe
        n = len(ids)
        first = min((a for a, b in spans if a < b), default=n)  # tokens before the first trained
        about = dict(tokens=n, prompt_tokens=first, chars=rendered.chars,
                     reasoning=rendered.reasoning)
        room = S - 1 if safe else S
        if t.overlong == "drop" and n > room:
            out.problem(i, k, DROPPED, OVERLONG, f"{n} tokens, more than the {room} a document "
                        f"holds (seq-length {S}{', trainer-safe' if safe else ''}); "
                        "--overlong truncate would cut it", raw, **about)
            return
        cap, lost = cut(ids, S, safe)
        trained = []  # token t is trained where a <= t < b: label t - 1 is input t, so t >= 1
        for a, b in spans:
            a, b = max(a, 1), min(b, cap)
            if a < b:
                trained += (a, b)
        if not trained:
            if first < n:
                why = [c for c, x in zip(CUTS[1:], lost[1:]) if x]
                limit = f"the {cap} tokens kept ({', '.join(why)})" if why else f"seq-length {S}"
                reason, detail = "prompt too long", f"{first} prompt tokens >= {limit}"
            else:
                reason, detail = "nothing to train", "no assistant turn is trained"
            out.problem(i, k, DROPPED, reason, detail, raw, **about)
            return
        ids = ids[:cap]
        ids[-1] = -1 - ids[-1]
        if any(lost):
            about.update(zip(("reason", "detail"), cut_report(lost, S)))
        out.sample(i, k, ids, trained, lost if any(lost) else [], about)


def _outcome(r) -> tuple:
    return (r.detail,) if isinstance(r, RecordError) else (r.text, r.trained, r.reasoning)


def _show(r) -> str:
    return f"rejected ({r.detail})" if isinstance(r, RecordError) else \
        f"text {r.text!r} spans {r.trained}" + (f" reasoning {r.reasoning}" if r.reasoning else "")


def cut(ids: np.ndarray, S: int, trainer_safe: bool) -> tuple[int, list[int]]:
    """How many of ``ids`` a sample keeps, and the tokens it loses to each of ``CUTS``.

    At most ``S``; with ``trainer_safe`` at most ``S - 1`` (a pad slot after a sample that sits
    alone in its document), and never ending on id 0 (stored as -1, Megatron's pad sentinel):
    cut back past every trailing 0.
    """
    n = len(ids)
    keep = min(n, S)
    lost = [n - keep, 0, 0]
    if trainer_safe:
        if keep == S:
            keep, lost[1] = S - 1, 1
        before = keep
        while keep and ids[keep - 1] == 0:
            keep -= 1
        lost[2] = before - keep
    return keep, lost


def cut_report(lost: list[int], S: int) -> tuple[str, str]:
    """The reason and detail of a sample that lost tokens: each cut with what it cost."""
    parts = [(c, x) for c, x in zip(CUTS, lost) if x]
    return (", ".join(c for c, _ in parts),
            "; ".join(f"{c}: lost {x:,} token{'s' * (x != 1)} ({CUT_DETAIL[c].format(S=S)})"
                      for c, x in parts))


class _Rows:
    """Column builder for the stage's output table; ``i`` is the input batch's row whose
    origin a row carries."""

    def __init__(self):
        self.rows: list[int] = []
        self.cols = {name: [] for name in SCHEMA.names
                     if name not in ORIGIN + ("input_ids", "trained", "cpu_ns")}
        self.ids: list[np.ndarray] = []
        self.trained: list[list[int]] = []

    def _row(self, i, **values) -> None:
        self.rows.append(i)
        for name, col in self.cols.items():
            col.append(values.get(name))

    def sample(self, i, k, ids, trained: list[int], lost: list[int], about: dict) -> None:
        self._row(i, sample=k, status=OK, lost=lost, **about)
        self.ids.append(ids)
        self.trained.append(trained)

    def problem(self, i, k, status, reason, detail, raw: bytes, **about) -> None:
        text = raw[:REJECT_TEXT_CHARS * 4].decode("utf-8", errors="replace")[:REJECT_TEXT_CHARS]
        self._row(i, sample=k, status=status, reason=reason, detail=detail, text=text, **about)
        self.ids.append(_EMPTY)
        self.trained.append([])

    def end(self, i) -> None:
        self._row(i, sample=-1, status=END)
        self.ids.append(_EMPTY)
        self.trained.append([])

    def table(self, batch: pa.Table) -> pa.Table:
        origin = batch.select(list(ORIGIN)).take(pa.array(self.rows, pa.int64()))
        arrays = [origin[name].combine_chunks() for name in ORIGIN]
        arrays += [pa.array(self.cols[name], SCHEMA.field(name).type) for name in self.cols]
        trained = np.fromiter(itertools.chain.from_iterable(self.trained), np.int32)
        arrays += [_list_array(list(map(len, self.ids)), np.concatenate(self.ids or [_EMPTY])),
                   _list_array(list(map(len, self.trained)), trained),
                   pa.nulls(len(self.rows), SCHEMA.field("cpu_ns").type)]
        return pa.Table.from_arrays(arrays, schema=SCHEMA)


_EMPTY = np.zeros(0, dtype=np.int32)


def _list_array(lengths: list[int], values: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, SCHEMA.field(
        "input_ids").type.value_type))


def _with_cpu(table: pa.Table, cpu_ns: list[int]) -> pa.Table:
    """``table`` with ``cpu_ns`` on its first row (a block holds at least one row)."""
    column = pa.array([cpu_ns] + [None] * (table.num_rows - 1), SCHEMA.field("cpu_ns").type)
    return table.set_column(SCHEMA.get_field_index("cpu_ns"), "cpu_ns", column)


def trained_tokens(trained: pa.ListArray) -> np.ndarray:
    """Each sample's count of trained tokens (its labels that are not ``IGNORE_INDEX``): the
    widths of its ``trained`` ranges, which do not overlap."""
    ranges = trained.values.to_numpy().reshape(-1, 2)  # indexed by the offsets, as they are
    widths = np.concatenate([[0], np.cumsum(ranges[:, 1] - ranges[:, 0], dtype=np.int64)])
    pairs = trained.offsets.to_numpy() // 2
    return widths[pairs[1:]] - widths[pairs[:-1]]


def labels(ids: pa.ListArray, trained: pa.ListArray) -> np.ndarray:
    """The labels of a block's samples, aligned with ``ids.values`` (``ids.offsets`` index
    both): ``labels[t] = ids[t+1]`` (a boundary's id restored) where token ``t+1`` is trained
    (``trained``'s ranges), else ``IGNORE_INDEX``. No range starts at a sample's token 0, so no
    label reaches into the next sample."""
    values = ids.values.to_numpy()
    n = len(values)
    ranges = pc.list_flatten(trained).to_numpy().reshape(-1, 2)
    owner = np.repeat(ids.offsets.to_numpy()[:-1].astype(np.int64),
                      np.diff(trained.offsets.to_numpy()) // 2)
    marks = np.zeros(n + 1, np.int32)  # +1 where a range starts, -1 where it ends
    marks[owner + ranges[:, 0]] += 1   # (the starts are distinct, and so are the ends)
    marks[owner + ranges[:, 1]] -= 1
    next_trained = np.cumsum(marks[1:n]) > 0  # for label t: is token t + 1 trained
    following = values[1:]
    out = np.full(n, IGNORE_INDEX, np.int32)
    out[:-1][next_trained] = np.where(following < 0, -1 - following, following)[next_trained]
    return out
