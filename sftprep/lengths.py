"""Length statistics of SFT data, and what a build at sequence length ``S`` would make of it.

The same Ray Data job as the build up to the tokenizer stage, with lengths instead of arrays:
``read → map_batches(stage) → driver``. Without a tokenizer the stage only parses records and
counts characters; with one it is the build's ``Tokenize`` stage itself (``TokenLengths``), which
drops the token arrays inside the actor, so only a few small columns reach the driver. The driver
reads them in input order and keeps per-sample lengths as int32 arrays, never the texts.

Character length is what the reference's ``sample_stats.py`` measures, ``len(instruction + input
+ output)``; for any record it is the characters of all its message contents (for plain Alpaca
records the same number; system prompts and history turns are counted too).

Token lengths project the build: a sample is dropped or cut exactly as ``Tokenize`` decides, and
the kept lengths (cut to ``S``), grouped by input line, go through the build's own packers
(``sftprep.packing``), so projected documents and efficiency equal what the build reaches.
Example, ``S = 10``, lines ``[6] [5] [3, 4] [2]``: none makes 4 documents (20/40 = 50%),
sequential 3 (67%), bfd 3 (67%).
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from sftprep import pipeline, runtime
from sftprep.config import (ConfigError, PackingConfig, RunConfig, SourceConfig, TemplateConfig,
                            TOKENIZER_HELP, given, opt, validate)
from sftprep.packing import MODES, Piece, make_packer
from sftprep.records import RecordError, parse_group
from sftprep.sources import ORIGIN, Origins, ReadRange, expand_inputs
from sftprep.sources import describe as describe_origin
from sftprep.tokenize import DROPPED, END, OK, REJECTED, Tokenize
from sftprep.tokenize import SCHEMA as TOKENIZE_SCHEMA
from sftprep.writer import Reports

LADDER = [512, 1024, 2048, 4096, 8192]
WHOLE_TARGET = 0.99      # recommended S keeps at least this fraction of samples whole
PERCENTILES = (50, 90, 95, 99, 99.9)
BAD_EXAMPLES = 20        # bad records listed in stats.json and on screen (all in the .jsonl)
STATS_JSON, HISTOGRAM, BAD_RECORDS = "stats.json", "token_lengths.png", "bad_records.jsonl"

# What the stage sends to the driver: one row per sample, per rejected record (sample -1) and
# per read task's end (status end).
SCHEMA = pa.schema([
    *(TOKENIZE_SCHEMA.field(name) for name in ORIGIN), ("sample", pa.int32()),
    ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("chars", pa.int32()),           # characters of all message contents
    ("tokens", pa.int32()),          # full token length (null without a tokenizer)
    ("prompt_tokens", pa.int32()),   # tokens before the first trained one
    ("written", pa.int32()),         # tokens the build writes at the configured S (0: dropped)
])


# -- configuration -------------------------------------------------------------------------------

@dataclass
class StatsSourceConfig(SourceConfig):
    on_error: str = opt("skip", "bad records: skip (count them and list them in "
                        f"DIR/{BAD_RECORDS}) or fail (stop at the first, naming file and line)",
                        "--on-error")


@dataclass
class StatsTemplateConfig(TemplateConfig):
    tokenizer: str | None = opt(None, TOKENIZER_HELP + "; optional: without it only character "
                                "lengths are reported",
                                "--tokenizer")


@dataclass
class StatsPackingConfig(PackingConfig):
    mode: str = opt("none", "the packing mode you plan to build with; every mode is projected, "
                    "this one is marked in the summary", "--packing")


@dataclass
class StatsOutputConfig:
    dir: str | None = opt(None, f"directory for {STATS_JSON} and {HISTOGRAM} (created; files "
                          "in it are replaced); default: print only", "--output-dir")
    ladder: list = opt(LADDER, "candidate sequence lengths projected besides --seq-length "
                       "(YAML only)")


@dataclass
class StatsConfig:
    source: StatsSourceConfig = field(default_factory=StatsSourceConfig)
    template: StatsTemplateConfig = field(default_factory=StatsTemplateConfig)
    packing: StatsPackingConfig = field(default_factory=StatsPackingConfig)
    output: StatsOutputConfig = field(default_factory=StatsOutputConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate_stats(config: StatsConfig) -> None:
    validate(config, need_tokenizer=False, need_output=False)
    ladder = config.output.ladder
    if not isinstance(ladder, list) or not all(isinstance(x, int) and x >= 2 for x in ladder):
        raise ConfigError(f"{given('output.ladder', ladder)}: must be a list of integers >= 2")


# -- the stage -----------------------------------------------------------------------------------

def record_chars(raw: bytes, format: str, columns: dict) -> list[int] | RecordError:
    """Characters of each sample of one raw record, or why the record is bad."""
    try:
        return [c.chars for c in parse_group(raw, format, columns)]
    except RecordError as e:
        return e


def char_lengths(batch: pa.Table, format: str = "auto", columns: dict | None = None) -> pa.Table:
    """The stage without a tokenizer: raw records in, one row per sample out (``SCHEMA``)."""
    rows = []  # (batch row, sample, status, reason, detail, chars)
    for i, raw in enumerate(batch["text"].to_pylist()):
        if raw is None:  # a read task's end row
            rows.append((i, -1, END, None, None, None))
            continue
        counts = record_chars(raw, format, columns or {})
        if isinstance(counts, RecordError):
            rows.append((i, -1, REJECTED, counts.reason, counts.detail, None))
        else:
            rows += [(i, k, OK, None, None, n) for k, n in enumerate(counts)]
    cols = list(zip(*rows)) if rows else [[]] * 6
    origin = batch.select(list(ORIGIN)).take(pa.array(cols[0], pa.int64()))
    arrays = [origin[name].combine_chunks() for name in ORIGIN]
    arrays += [pa.array(c, SCHEMA.field(name).type)
               for c, name in zip(cols[1:], ("sample", "status", "reason", "detail", "chars"))]
    arrays += [pa.nulls(len(rows), pa.int32())] * 3  # no tokenizer: no token lengths
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


class TokenLengths(Tokenize):
    """The build's tokenizer stage, sending on lengths only (the arrays stay in the actor)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        t = super().__call__(batch)
        written = pc.cast(pc.list_value_length(t["input_ids"]), pa.int32())
        return t.append_column("written", written).select(SCHEMA.names)



def lengths_dataset(config: StatsConfig, plan) -> ray.data.Dataset:
    if config.template.tokenizer:
        return pipeline.tokenized_dataset(config, plan, stage=TokenLengths)
    return pipeline.record_dataset(config, plan).map_batches(
        char_lengths, batch_size=config.run.batch_size, batch_format="pyarrow",
        fn_kwargs={"format": config.source.format, "columns": config.source.columns})


# -- the driver: lengths in input order ----------------------------------------------------------

@dataclass
class SampleLengths:
    """Per-sample lengths in input order, as compact arrays (rejected lines are not samples)."""

    group: np.ndarray    # int32, index of the sample's input line (its packing group)
    chars: np.ndarray    # int32
    tokens: np.ndarray   # int32, full length before any cut; -1 without a tokenizer
    prompt: np.ndarray   # int32, tokens before the first trained one
    ok: np.ndarray       # bool, kept by the stage at the configured S (not dropped)
    written: np.ndarray  # int32, tokens the stage kept at the configured S
    source: np.ndarray   # int32, the source the sample's record came from
    # The record's identity where its source has copies (-1 elsewhere): the read range it came
    # from (``copy_range``) and its place there, the same for every copy (``writer``'s rule).
    copy_range: np.ndarray  # int32
    place: np.ndarray       # int64, line * 2**31 + element + 1

    def of_source(self, k: int) -> "SampleLengths":
        """The samples of source ``k``."""
        mine = self.source == k
        return SampleLengths(**{f.name: getattr(self, f.name)[mine] for f in fields(self)})

    def kept_at(self, S: int, seq_length: int, trainer_safe: bool,
                overlong: str = "truncate") -> np.ndarray:
        """Samples a build at ``S`` would keep: the stage's own verdict at the configured length,
        else its rule (a trained token must fall inside the first ``S``, or ``S - 1`` with
        ``template.trainer_safe``; with ``--overlong drop`` the whole sample must)."""
        if S == seq_length:
            return self.ok
        room = S - 1 if trainer_safe else S
        kept = (self.prompt < room) & (self.prompt < self.tokens)
        return kept & (self.tokens <= room) if overlong == "drop" else kept

    def written_at(self, S: int, seq_length: int, trainer_safe: bool,
                   overlong: str = "truncate") -> np.ndarray:
        """Tokens each kept sample fills at ``S``: what the stage wrote at the configured length,
        else the cut at ``S`` (``S - 1`` with ``trainer_safe``; its rarer cut of a trailing id 0
        needs the tokens, so other lengths may be off by those)."""
        kept = self.kept_at(S, seq_length, trainer_safe, overlong)
        if S == seq_length:
            return self.written[kept]
        return np.minimum(self.tokens[kept], S - 1 if trainer_safe else S)


class Collector:
    """Takes the stage's blocks in input order; keeps int32 lengths, per-source counts and the
    bad-record list (``writer.Reports``, the build's rule)."""

    def __init__(self, files: list[str], on_error: str, bad_path: str | None,
                 plan: list[ReadRange] | None = None, sources: int = 1):
        plan = plan or [ReadRange(i, url) for i, url in enumerate(files)]
        self.origins = Origins(files, [r.pass_key for r in plan])
        self.task_source = np.array([r.source for r in plan], dtype=np.int32)
        self.whole = np.array([r.select is None for r in plan])
        copied = {r.source for r in plan if r.copy}
        ranges = {key: k for k, key in enumerate(dict.fromkeys(
            (files[r.file], r.start) for r in plan if r.source in copied))}
        self.task_range = np.array([ranges[(files[r.file], r.start)] if r.source in copied
                                    else -1 for r in plan], dtype=np.int32)
        self.reports = Reports(bad_path, on_error, "to count and list bad records")
        self.parts: dict[str, list[np.ndarray]] = {f.name: [] for f in fields(SampleLengths)}
        self.records = 0
        self._last = (-1, -1, -1)
        self.bad_count = 0
        self.bad_reasons: Counter = Counter()
        self.bad_examples: list[dict] = []
        self.dropped_reasons: Counter = Counter()
        # per source: records read (a selection's passed-over records too), selected, bad
        self.by_source = np.zeros((sources, 3), dtype=np.int64)
        for r in plan:
            if r.select:
                self.by_source[r.source, 0] += r.select.count

    def add(self, t: pa.Table) -> None:
        status = t["status"]
        marks = t.filter(pc.is_in(status, pa.array([END, REJECTED])))
        if marks.num_rows:  # in input order: each task's lines counted before they are used
            self._ends_and_rejects(marks)
        t = t.filter(pc.not_equal(status, END))
        if t.num_rows == 0:
            return
        key = [t[n].to_numpy() for n in ("task", "line", "element")]
        new = np.ones(t.num_rows, dtype=bool)
        new[1:] = np.any([k[1:] != k[:-1] for k in key], axis=0)
        new[0] = tuple(int(k[0]) for k in key) != self._last
        group = self.records + np.cumsum(new) - 1
        self.records = int(group[-1]) + 1
        self._last = tuple(int(k[-1]) for k in key)
        tasks = key[0][new]
        sources = self.task_source[tasks]
        n = len(self.by_source)
        self.by_source[:, 0] += np.bincount(sources[self.whole[tasks]], minlength=n)
        self.by_source[:, 1] += np.bincount(sources, minlength=n)
        sample = t["sample"].to_numpy() >= 0
        status = t["status"]
        for name, col in (("chars", "chars"), ("tokens", "tokens"), ("prompt", "prompt_tokens"),
                          ("written", "written")):
            values = pc.fill_null(t[col], -1).to_numpy().astype(np.int32)
            self.parts[name].append(values[sample])
        self.parts["group"].append(group[sample].astype(np.int32))
        self.parts["source"].append(self.task_source[key[0][sample]])
        self.parts["copy_range"].append(self.task_range[key[0][sample]])
        self.parts["place"].append(key[1][sample].astype(np.int64) * 2**31
                                   + key[2][sample].astype(np.int64) + 1)
        self.parts["ok"].append(pc.equal(status, OK).to_numpy(zero_copy_only=False)[sample])
        dropped = t.filter(pc.equal(status, DROPPED))
        self.dropped_reasons.update(dropped["reason"].to_pylist())

    def _ends_and_rejects(self, rows: pa.Table) -> None:
        """Read tasks' ends and rejected records, in input order."""
        for task, f, line, element, status, reason, detail in zip(*(rows[n].to_pylist() for n in (
                "task", "file", "line", "element", "status", "reason", "detail"))):
            if status == END:
                self.origins.end(task, line)
                continue
            self.origins.enter(task)
            entry = {**self.origins.locate(f, line, element), "reason": reason, "detail": detail}
            self.reports.add(entry)
            self.bad_count += 1
            self.bad_reasons[reason] += 1
            self.by_source[self.task_source[task], 2] += 1
            if len(self.bad_examples) < BAD_EXAMPLES:
                self.bad_examples.append(entry)

    def finish(self) -> SampleLengths:
        self.origins.finish()
        self.reports.close()
        empty = {"ok": bool, "place": np.int64}
        return SampleLengths(**{name: np.concatenate(p) if p else
                                np.zeros(0, dtype=empty.get(name, np.int32))
                                for name, p in self.parts.items()})

    def source_counts(self, k: int) -> dict:
        read, selected, bad = (int(x) for x in self.by_source[k])
        return {"records_read": read, "records": selected, "bad_records": bad}


# -- projections ---------------------------------------------------------------------------------

def project(lengths: SampleLengths, S: int, mode: str, window: int, seq_length: int,
            trainer_safe: bool, overlong: str = "truncate") -> dict:
    """Documents and efficiency of a build at ``S``: the build's packer over the kept lengths
    (cut as the build cuts them), one group per input line, in input order."""
    kept = lengths.kept_at(S, seq_length, trainer_safe, overlong)
    pieces = lengths.written_at(S, seq_length, trainer_safe, overlong)
    groups = lengths.group[kept]
    records = [None if r < 0 else (r, p) for r, p in zip(lengths.copy_range[kept].tolist(),
                                                          lengths.place[kept].tolist())]
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1, [len(groups)]])
    packer = make_packer(mode, S, window)
    docs = 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b > a:
            docs += sum(1 for _ in packer.add([Piece(n, record=r) for n, r in
                                               zip(pieces[a:b].tolist(), records[a:b])]))
    docs += sum(1 for _ in packer.flush())
    tokens = int(pieces.sum(dtype=np.int64))
    return {"docs": docs, "tokens": tokens,
            "efficiency": round(tokens / (docs * S), 6) if docs else 0.0}


_project_task = ray.remote(num_cpus=1)(project)


def at_length(lengths: SampleLengths, S: int, seq_length: int, trainer_safe: bool,
              overlong: str = "truncate") -> dict:
    """What a build at ``S`` does to the samples: dropped, truncated (longer than ``S``), whole."""
    kept = lengths.kept_at(S, seq_length, trainer_safe, overlong)
    cut = kept & (lengths.tokens > S)
    n = len(kept)
    whole = int(np.count_nonzero(kept & ~cut))
    return {"seq_length": S, "samples": n, "kept": int(np.count_nonzero(kept)),
            "dropped": int(n - np.count_nonzero(kept)), "truncated": int(np.count_nonzero(cut)),
            "tokens_cut": int((lengths.tokens[cut] - S).sum(dtype=np.int64)),
            "whole": whole, "whole_fraction": round(whole / n, 6) if n else 0.0}


def describe(chars: np.ndarray) -> dict:
    """pandas ``describe()`` of the character lengths, as the reference prints it."""
    import pandas as pd
    if len(chars) == 0:
        return {"count": 0.0}
    return {k: float(v) for k, v in pd.Series(chars.astype(np.int64)).describe().items()}


def percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    out = {"min": int(values.min()), "mean": round(float(values.mean()), 3)}
    out.update({f"p{p:g}": float(np.percentile(values, p)) for p in PERCENTILES})
    out["max"] = int(values.max())
    return out


def token_stats(lengths: SampleLengths, config: StatsConfig, dropped_reasons: Counter) -> dict:
    S, window = config.template.seq_length, config.packing.window
    ladder = sorted(set(config.output.ladder) | {S})
    ref = ray.put(lengths)
    rule = config.template.trainer_safe, config.template.overlong
    jobs = {(L, m): _project_task.remote(ref, L, m, window, S, *rule) for L in ladder
            for m in MODES}
    packed = {key: ray.get(job) for key, job in jobs.items()}
    rows = [{**at_length(lengths, L, S, *rule), "packing": {m: packed[L, m] for m in MODES}}
            for L in ladder]
    good = [r["seq_length"] for r in rows if r["samples"] and r["whole_fraction"] >= WHOLE_TARGET]
    prompt, total = lengths.prompt, lengths.tokens
    return {
        "tokenizer": config.template.tokenizer,
        "seq_length": S,
        "tokens": {"prompt": percentiles(prompt), "response": percentiles(total - prompt),
                   "total": percentiles(total)},
        "at_seq_length": {**next(r for r in rows if r["seq_length"] == S),
                          "dropped_by_reason": dict(sorted(dropped_reasons.items()))},
        "packing": {m: packed[S, m] for m in MODES},
        "packing_mode": config.packing.mode,
        "packing_window": window,
        "ladder": rows,
        "recommended_seq_length": min(good) if good else None,
        "recommended_rule": f"smallest ladder value keeping >= {WHOLE_TARGET:.0%} of samples "
                            "whole (not dropped, not truncated)",
    }


def source_lengths(lengths: SampleLengths, config: StatsConfig) -> dict:
    """One source's share: its samples' characters, and with a tokenizer their tokens and what
    a build at ``--seq-length`` does to them (to plan a mixture before building)."""
    out = {"samples": len(lengths.group), "chars": percentiles(lengths.chars)}
    if config.template.tokenizer:
        S, safe = config.template.seq_length, config.template.trainer_safe
        out.update({"tokens": percentiles(lengths.tokens),
                    "tokens_written": int(lengths.written_at(S, S, safe).sum(dtype=np.int64)),
                    "at_seq_length": at_length(lengths, S, S, safe)})
    return out


# -- the job -------------------------------------------------------------------------------------

def run(config: StatsConfig) -> dict:
    """Run the statistics job; write ``stats.json`` and the histogram if ``output.dir`` is set."""
    return measure(config)[0]


def measure(config: StatsConfig) -> tuple[dict, SampleLengths]:
    """``run``'s statistics, and the per-sample lengths they come from (for a plot). A lost
    local Ray runtime ends it with ``runtime.RuntimeLost`` (one line), as a build."""
    with runtime.watched_runtime():
        return _measure(config)


def _measure(config: StatsConfig) -> tuple[dict, SampleLengths]:
    validate_stats(config)
    files = expand_inputs(config.source.inputs, config.source.storage_options)
    out_dir = config.output.dir
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for name in (STATS_JSON, HISTOGRAM, BAD_RECORDS):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    runtime.ensure_ray(config.run.verbose)
    plan = pipeline.read_plan(config, files)
    sources = pipeline.source_list(config)
    collector = Collector([f.url for f in files], config.source.on_error,
                          os.path.join(out_dir, BAD_RECORDS) if out_dir else None,
                          plan, len(sources))
    columns = SCHEMA.names
    for batch in lengths_dataset(config, plan).iter_batches(batch_size=None,
                                                             batch_format="pyarrow"):
        collector.add(batch.select(columns))
    lengths = collector.finish()
    stats = {
        "inputs": [f.url for f in files],
        "records": collector.records,
        "samples": len(lengths.group),
        "bad_records": {"count": collector.bad_count,
                        "by_reason": dict(sorted(collector.bad_reasons.items())),
                        "examples": collector.bad_examples},
        "chars": describe(lengths.chars),
    }
    if config.template.tokenizer:
        stats.update(token_stats(lengths, config, collector.dropped_reasons))
    stats["sources"] = [{"source": s.spec, **collector.source_counts(k),
                         **source_lengths(lengths.of_source(k), config)}
                        for k, s in enumerate(sources)]
    if out_dir:
        plot = bool(config.template.tokenizer)
        if plot and not _have_matplotlib():
            plot = False
            stats["notes"] = [f"{HISTOGRAM} not drawn: the plot needs matplotlib "
                              "(pip install 'sftprep[stats]'); everything else is in "
                              f"{STATS_JSON}"]
        with open(os.path.join(out_dir, STATS_JSON), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, ensure_ascii=False)
        if plot:
            histogram(lengths.tokens, stats, os.path.join(out_dir, HISTOGRAM))
        stats["files"] = sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir)
                                if n in (STATS_JSON, HISTOGRAM, BAD_RECORDS))
    return stats, lengths


def _have_matplotlib() -> bool:
    """matplotlib is the ``stats`` extra's, not a dependency: without it only the plot is lost."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def histogram(tokens: np.ndarray, stats: dict, path: str) -> None:
    histogram_figure(tokens, stats).savefig(path, dpi=110)


def histogram_figure(tokens: np.ndarray, stats: dict):
    """Histogram of total token lengths with ``S`` (and the recommended S) marked: a matplotlib
    ``Figure`` of its own (no pyplot state) that a notebook shows inline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    S, best = stats["seq_length"], stats["recommended_seq_length"]
    fig = _inline_figure()(figsize=(9, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(tokens, bins=min(100, max(10, len(tokens) // 20)), color="#4c72b0")
    ax.axvline(S, color="#c44e52", linestyle="--", linewidth=1.5, label=f"S = {S:,}")
    if best and best != S:
        ax.axvline(best, color="#55a868", linestyle=":", linewidth=1.5,
                   label=f"recommended S = {best:,}")
    at = stats["at_seq_length"]
    ax.set_title(f"{at['samples']:,} samples: {at['truncated']:,} truncated, "
                 f"{at['dropped']:,} dropped at S = {S:,}")
    ax.set_xlabel("tokens per sample (chat template applied, before any cut)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    return fig


@functools.cache
def _inline_figure() -> type:
    """``Figure`` that IPython displays as PNG itself: without pyplot (and its inline backend)
    a notebook would show a bare Figure as ``<Figure size 900x480 with 1 Axes>``."""
    from matplotlib.figure import Figure

    class InlineFigure(Figure):
        def _repr_png_(self) -> bytes:
            out = io.BytesIO()
            self.savefig(out, format="png", dpi=80)
            return out.getvalue()
    return InlineFigure


def tables(stats: dict) -> tuple:
    """pandas DataFrames of ``stats``: lengths per part (characters; with a tokenizer also
    prompt, response and total tokens), and per candidate S what a build would make."""
    import pandas as pd

    parts = {"characters": stats["chars"]}
    for part in ("prompt", "response", "total"):
        if "tokens" in stats:
            parts[f"{part} tokens"] = stats["tokens"][part]
    lengths = pd.DataFrame.from_dict(parts, orient="index")
    if "ladder" not in stats:
        return lengths, None
    rows = {r["seq_length"]: {"whole": r["whole_fraction"], "dropped": r["dropped"],
                              "truncated": r["truncated"],
                              **{f"{m} {k}": r["packing"][m][k] for m in MODES
                                 for k in ("docs", "efficiency")}}
            for r in stats["ladder"]}
    ladder = pd.DataFrame.from_dict(rows, orient="index")
    ladder.index.name = "S"
    return lengths, ladder


# -- what people read ----------------------------------------------------------------------------

def describe_text(chars: dict) -> str:
    """The describe() block exactly as pandas (and the reference's sample_stats.py) prints it."""
    import pandas as pd
    return str(pd.Series(chars, dtype="float64"))


def summary_text(stats: dict) -> str:
    bad = stats["bad_records"]
    lines = ["characters per sample (Alpaca: instruction + input + output; chats: every "
             "message's content), as the reference's sample_stats.py prints them:",
             describe_text(stats["chars"]), "",
             f"records {stats['records']:,}, samples {stats['samples']:,}, "
             f"bad records {bad['count']:,}" + _reasons(bad["by_reason"])]
    for e in bad["examples"][:10]:
        lines.append(f"  {describe_origin(e)}: {e['reason']}: {e['detail']}")
    if "tokens" in stats:
        lines += ["", "tokens per sample under the chat template (prompt: the tokens before "
                  "the first trained one; in a multi-turn chat, everything up to the first "
                  "assistant reply; response: the rest, later turns included; before any cut):",
                  _token_table(stats["tokens"]), "", _ladder_table(stats)]
        at = stats["at_seq_length"]
        lines += ["", f"at S = {stats['seq_length']:,}: {at['dropped']:,} dropped"
                  + _reasons(at.get("dropped_by_reason", {}))
                  + f", {at['truncated']:,} truncated ({at['tokens_cut']:,} tokens lost), "
                  f"{at['whole_fraction']:.2%} whole"]
        best = stats["recommended_seq_length"]
        lines.append(f"recommended S: {best:,}" if best else
                     f"recommended S: none of the ladder keeps {WHOLE_TARGET:.0%} whole "
                     f"(longest sample {stats['tokens']['total'].get('max', 0):,} tokens)")
    if len(stats.get("sources", [])) > 1:
        lines += ["", _source_table(stats)]
    for path in stats.get("files", []):
        lines.append(f"wrote {path}")
    lines += [f"note: {note}" for note in stats.get("notes", [])]
    return "\n".join(lines)


def _token_table(tokens: dict) -> str:
    keys = list(tokens["total"])
    out = ["tokens    " + "".join(f"{k:>10}" for k in keys)]
    for part in ("prompt", "response", "total"):
        out.append(f"{part:<10}" + "".join(f"{tokens[part][k]:>10,.0f}" for k in keys))
    return "\n".join(out)


def _ladder_table(stats: dict) -> str:
    head = f"{'S':>8} {'whole':>8} {'dropped':>8} {'truncated':>9}"
    for m in MODES:
        name = m + ("*" if m == stats["packing_mode"] else "")
        head += f" {name + ' docs':>16} {'eff':>7}"
    out = [head]
    for r in stats["ladder"]:
        mark = " <" if r["seq_length"] == stats["seq_length"] else ""
        row = (f"{r['seq_length']:>8,} {r['whole_fraction']:>8.2%} {r['dropped']:>8,} "
               f"{r['truncated']:>9,}")
        for m in MODES:
            p = r["packing"][m]
            row += f" {p['docs']:>16,} {p['efficiency']:>7.2%}"
        out.append(row + mark)
    out.append(f"(< your --seq-length; * your --packing; eff = non-pad tokens / (docs * S); "
               f"bfd window {stats['packing_window']:,})")
    return "\n".join(out)


def _source_table(stats: dict) -> str:
    """Per source: records read and selected, samples, and with a tokenizer their tokens and
    what ``--seq-length`` drops and cuts."""
    tokens = "tokens" in stats
    head = f"{'source':<32} {'read':>9} {'selected':>9} {'samples':>9} {'bad':>6}"
    if tokens:
        head += f" {'tokens':>12} {'p50':>7} {'p99':>7} {'max':>7} {'dropped':>8} {'cut':>7}"
    out = [head]
    for s in stats["sources"]:
        row = (f"{_short(s['source'], 32):<32} {s['records_read']:>9,} {s['records']:>9,} "
               f"{s['samples']:>9,} {s['bad_records']:>6,}")
        if tokens:
            t, at = s.get("tokens") or {}, s["at_seq_length"]
            row += (f" {s['tokens_written']:>12,} {t.get('p50', 0):>7,.0f} {t.get('p99', 0):>7,.0f}"
                    f" {t.get('max', 0):>7,} {at['dropped']:>8,} {at['truncated']:>7,}")
        out.append(row)
    if tokens:
        out.append(f"(tokens: written at S = {stats['seq_length']:,}; p50/p99/max: tokens per "
                   "sample before any cut)")
    return "\n".join(out)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _reasons(by: dict) -> str:
    return (" (" + ", ".join(f"{k}: {v:,}" for k, v in by.items()) + ")") if by else ""
