"""The Ray Data job: read → map_batches(Tokenize) on an actor pool → ordered writer actors (one,
or one per shard). Top to bottom: the read stage's Datasource, the read and tokenize datasets,
``build``, and ``feed``, which routes the blocks. The Ray runtime and the one-line failures are
``runtime``'s; the output set (prefixes, stale files, publishing, the manifest) is ``outputs``'.

Order: ``preserve_order`` makes Ray Data hand out blocks in input order however many read tasks
and tokenizer actors ran; the driver passes block *references* (never the data) to each writer
actor, one call at a time in that order, and the writer checks the order itself. So the
output bytes depend only on the input and the configuration. With ``--shards N`` there are N
writers, each owning a contiguous range of read tasks (``shards``); a block goes, in the same
order, to the writer(s) owning its rows.

Placement: a local output's writers run on the driver's node (their disk); a remote output's
are spread over the cluster (each streams its own parts to the store).

CPU budget: a pool that claims every CPU starves the read tasks and the job stalls, so each
tokenizer actor claims at most 90% of a CPU share and read tasks claim a tenth of a CPU.
Memory: the object store holds at most ``STORE_BLOCKS_PER_CPU`` blocks per CPU, so reading
never runs far ahead of tokenizing and memory stays flat as the input grows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from dataclasses import asdict
from typing import Callable, Iterator

import pyarrow as pa
import ray

import sftprep
from sftprep import outputs, runtime, tokenizer_files
from sftprep.budget import Phases
from sftprep.config import BuildConfig, validate
from sftprep.encode import Setup, prepare
from sftprep.ray_compat import (progress_bars, read_datasource, read_task,
                                with_object_store_limit)
from sftprep.shards import shard_of_tasks, task_ranges, task_reach, task_span
from sftprep.sources import SCHEMA as RECORD_SCHEMA
from sftprep.sources import (InputFile, ReadRange, auto_split_bytes, count_records,
                             expand_inputs, mixture_plan, parse_source, plan_reads, read_range)
from sftprep.storage import is_remote, redact, resolve_options
from sftprep.template import load_tokenizer
from sftprep.tokenize import GUARD_EVERY, GUARD_LINES, Tokenize, TokenizeSpec
from sftprep.writer import SFTWriter

READ_CPUS = 0.1
ACTOR_CPU_SHARE = 0.9
MAX_BLOCKS_IN_FLIGHT = 4
# Ray Data merges a read task's output into blocks of up to 128 MiB by default: hundreds of
# thousands of records per tokenizer task, coarse progress and a long redo when an actor dies.
BLOCK_BYTES = 8 << 20
# Ray Data reads ahead as far as its share of the object store allows (half the store, which
# is 30% of RAM by default): a 1M-sample build held 0.9 GB of records there, ten times what
# 100k held. This many blocks per CPU keep every tokenizer fed, whatever the input size.
STORE_BLOCKS_PER_CPU = 16
# A read block is at least this big unless its file ends (2048 records of 32 bytes).
MIN_BLOCK_BYTES = 64 << 10


class RecordSource(ray.data.Datasource):
    """One read task per planned range (a file, or a part of a large one), streaming it as
    blocks of raw records (see ``sources``); task ``k`` reads ``plan[k]``."""

    def __init__(self, plan: list[ReadRange], storage_options: dict, block_records: int):
        self.plan = plan
        self.storage_options = storage_options
        self.block_records = block_records

    def estimate_inmemory_data_size(self) -> int:
        return sum(r.size for r in self.plan)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for task, r in enumerate(self.plan):
            def read(r=r, task=task) -> Iterator[pa.Table]:
                yield from read_range(r, task, self.storage_options, self.block_records)
            tasks.append(read_task(read, r.size, r.url, RECORD_SCHEMA))
        return tasks

    def get_name(self) -> str:
        return "ReadSFTRecords"


def tokenize_spec(config: BuildConfig) -> TokenizeSpec:
    return TokenizeSpec(config.template, config.source.format,
                        tuple(sorted(config.source.columns.items())))


# The tokenizers this process loaded last, by what makes them: a notebook's next build (or
# stats run) with the same tokenizer skips loading it and preparing its fast path (~1.5 s).
_LOADED: dict = {}
LOADED_KEEP = 2


def loaded_tokenizer(config: BuildConfig) -> tuple[Setup, tokenizer_files.Resolved]:
    """The tokenizer, template and encoding backend every actor gets (``encode.Setup``), and
    where its files came from (``tokenizer_files.Resolved``), decided here once. Resolving runs
    every time (a store copy may have changed); loading and preparing only when neither this
    process (its last ``LOADED_KEEP``) nor the disk (``tokenizer_files.load_prepared``) holds
    the result for these files, pad token, template, backend and code."""
    t = config.template
    resolved = tokenizer_files.resolve(t.tokenizer, config.source.storage_options)
    template = None
    if t.chat_template:
        with open(t.chat_template, encoding="utf-8") as f:
            template = f.read()
    key = tokenizer_files.prepared_key(resolved.files, t.pad_token, template, t.backend)
    if key not in _LOADED:
        setup = tokenizer_files.load_prepared(key)
        if setup is None:
            setup = prepare(load_tokenizer(resolved.path, t.pad_token, t.chat_template),
                            t.backend)
            tokenizer_files.keep_prepared(key, setup)
        while len(_LOADED) >= LOADED_KEEP:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = setup
    return _LOADED[key], resolved


def cluster_cpus() -> float:
    return ray.cluster_resources().get("CPU", 1)


def read_plan(config: BuildConfig, files: list[InputFile]) -> list[ReadRange]:
    """The read tasks: large files split in ranges of ``source.split_bytes`` (default: enough
    ranges for every CPU of the cluster, see ``sources.auto_split_bytes``), repeated for every
    pass over a source and carrying the sources' selections (``sources.mixture_plan``): the
    ranges of sources that take samples or a fraction are counted first, in parallel."""
    split = config.source.split_bytes
    if split is None:
        split = auto_split_bytes(files, cluster_cpus())
    options = resolve_options([f.url for f in files], config.source.storage_options)
    plan = plan_reads(files, split, options)
    sources = source_list(config)
    counted = [i for i, r in enumerate(plan) if sources[r.source].counted]
    count = ray.remote(num_cpus=READ_CPUS)(count_records)
    counts = dict(zip(counted, ray.get([count.remote(plan[i], options) for i in counted])))
    return mixture_plan(plan, sources, counts, config.source.seed)


def source_list(config: BuildConfig) -> list:
    """The sources (``sources.Source``) the inputs name."""
    return [parse_source(e, config.source.storage_options) for e in config.source.inputs]


def sources_section(config: BuildConfig, files: list[InputFile], plan: list[ReadRange]) -> list:
    """The manifest's ``sources``: each as written, its selection, its records (when counted)
    and what each pass over it keeps (null: all)."""
    out = []
    for k, source in enumerate(source_list(config)):
        tasks = [r for r in plan if r.source == k]
        partial = [r.select for r in tasks if r.select]
        out.append({"source": source.spec, "path": source.path, **source.selection(),
                    **({"records": partial[0].total} if partial else {}),
                    "passes": [next((r.select.keep for r in tasks if r.copy == c and r.select),
                                    None) for c in sorted({r.copy for r in tasks})],
                    "files": sum(f.source == k for f in files)})
    return out


def record_dataset(config: BuildConfig, plan: list[ReadRange]) -> ray.data.Dataset:
    """The read stage: raw records in input order.

    The settings go on the current DataContext before the dataset exists: a dataset keeps a
    copy of the context it was made with, and later stages inherit that copy.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = with_object_store_limit(
        ctx.execution_options.resource_limits,
        max(2, int(cluster_cpus())) * STORE_BLOCKS_PER_CPU * BLOCK_BYTES)
    ctx.target_max_block_size = BLOCK_BYTES
    # Ray Data's own bars only with --verbose: sftprep shows its own (``progress``)
    ctx.enable_progress_bars = progress_bars(config.run.progress and config.run.verbose)
    options = resolve_options([r.url for r in plan], config.source.storage_options)
    return read_datasource(RecordSource(plan, options, config.run.block_records), READ_CPUS)


def tokenized_dataset(config: BuildConfig, plan: list[ReadRange],
                      stage: type[Tokenize] = Tokenize,
                      setup: Setup | None = None) -> ray.data.Dataset:
    """The read and tokenize stages, in input order (``stage``: Tokenize or a subclass).

    No more actors than the input has blocks: each one costs a worker process and a second
    or two of start-up, for nothing if it gets no block.
    """
    ds = record_dataset(config, plan)
    cpus = cluster_cpus()
    blocks = sum(max(1, -(-r.size // MIN_BLOCK_BYTES)) for r in plan)
    workers = min(config.run.workers or max(1, int(cpus)), blocks)
    actor_cpus = round(min(1.0, cpus / workers) * ACTOR_CPU_SHARE, 3)
    urls = {r.file: r.url for r in plan}
    spec = dataclasses.replace(tokenize_spec(config), files=tuple(
        urls.get(i, "") for i in range(max(urls, default=-1) + 1)),
        starts=tuple(r.start for r in plan))
    # One copy of the setup (~8 MB for a 150k vocabulary) in the object store for every actor,
    # passed inside a list so Ray hands the reference, not a copy per actor's arguments.
    setup_ref = [ray.put(setup or loaded_tokenizer(config)[0])]
    return ds.map_batches(stage, fn_constructor_args=(spec, setup_ref),
                          batch_size=config.run.batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=actor_cpus)


def build(config: BuildConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run the whole build; return the manifest (whose ``summary`` has the figures): validate,
    plan, start the writers, feed them, finish (``outputs.finish``). A failure cleans up
    (``outputs.abandon``) and ends in one line (``runtime.guarded``)."""
    validate(config)
    started = time.time()
    wall = Phases(clock=time.perf_counter_ns)  # the driver's steps, in wall time
    files = expand_inputs(config.source.inputs, config.source.storage_options)
    outputs.remove_unnamed_shards(config, resolve_options([config.document_prefix],
                                                          config.source.storage_options))
    outputs.check_output_free(config)
    wall.lap("inputs")
    tokenizer = runtime.in_background(lambda: loaded_tokenizer(config))
    runtime.ensure_ray(config.run.verbose)  # Ray's start is mostly waiting: the tokenizer loads
    wall.lap("ray_start")
    setup, resolved = tokenizer()      # meanwhile
    wall.lap("tokenizer")
    plan = read_plan(config, files)
    wall.lap("plan")
    options = resolve_options([config.document_prefix], config.source.storage_options)
    task_shard = shard_of_tasks([r.size * r.select.keep // r.select.total if r.select else r.size
                                 for r in plan], config.output.shards)
    outputs.abort_stale_uploads(config, options)
    writers = start_writers(config, files, plan, setup, options, task_shard)
    leftovers = ray.get([w.leftovers.remote() for w in writers])
    writer_pids = [pid for pid, _ in leftovers]
    temporary = [p for _, paths in leftovers for p in paths]
    uploads: list[tuple[str, str]] = []  # (url, upload id) the writers started, in that order
    wall.lap("writers")

    def node_lost() -> None:  # no Ray call can answer now; the writers' files are on this node
        runtime.stop_processes(writer_pids)  # a writer outlives its raylet a moment: stop it
        outputs.remove_temporary(temporary)
        outputs.abort_uploads(config, options, uploads)

    def release() -> None:
        for w in writers:
            ray.kill(w, no_restart=True)

    with runtime.guarded(node_lost, lambda: outputs.abandon(config, options, writers, temporary,
                                                            uploads), release):
        reach = task_reach([r.pass_key for r in plan], task_ranges(task_shard, len(writers)))
        feed(tokenized_dataset(config, plan, setup=setup), writers, reach, on_progress, started,
             len(plan), uploads, wall)
        wall.lap("stream")
        extra = manifest_extra(config, files, plan, started, setup, resolved, wall.seconds())
        return outputs.finish(config, writers, extra, options)


def manifest_extra(config: BuildConfig, files: list[InputFile], plan: list[ReadRange],
                   started: float, setup: Setup, resolved, wall: dict) -> dict:
    """The manifest's sections about the run itself: versions, times (``wall``: the driver's
    steps), sources, inputs, the tokenizer and the configuration (``shards.assemble_manifest``
    adds the figures, and the writers' CPU to the times)."""
    checks = " and ".join([*(["HF re-encoded"] if setup.backend == "fast" else []),
                           *(["Jinja re-rendered"] if setup.renderer == "traced" else [])])
    return {
        "sftprep_version": sftprep.__version__,
        "ray_version": ray.__version__,
        "created_unix": round(started, 3),
        "elapsed_seconds": round(time.time() - started, 3),
        "timing": {"wall_seconds": wall},
        "seed": config.source.seed,
        "sources": sources_section(config, files, plan),
        "inputs": [{"url": f.url, "bytes": f.size, "source": f.source,
                    "read_tasks": sum(r.file == i for r in plan)}
                   for i, f in enumerate(files)],
        "tokenizer": {"path": config.template.tokenizer,
                      "source": {**resolved.source,
                                 "local_dir": os.path.abspath(resolved.path)},
                      "files": resolved.files,
                      "sha256": tokenizer_files.fingerprint(resolved.files, setup),
                      "pad_token": setup.pad_token, "pad_id": setup.pad_id,
                      "vocab_size": setup.vocab_size, **setup.describe(),
                      **({"guard": f"{checks} each actor's first batch, the first "
                                   f"{GUARD_LINES} lines of every file and 1 in "
                                   f"{GUARD_EVERY} other samples: all identical"}
                         if checks else {})},
        "config": redact(asdict(config)),
    }


def start_writers(config: BuildConfig, files: list[InputFile], plan: list[ReadRange],
                  setup: Setup, options: dict, task_shard: list[int]) -> list:
    """One writer actor per shard, on the driver's node for a local output, else spread."""
    if is_remote(config.document_prefix):
        placement = "SPREAD"
    else:
        placement = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
    prefixes = outputs.output_prefixes(config)
    owns = [None] if len(prefixes) == 1 else task_ranges(task_shard, len(prefixes))
    return [ray.remote(SFTWriter).options(
        num_cpus=0, max_restarts=0, scheduling_strategy=placement,
    ).remote(prefix, [f.url for f in files], config.template.seq_length, setup.pad_id,
             config.packing.mode, config.packing.window, config.source.on_error, options,
             config.output.spill_dir, setup.vocab_size, plan,
             trainer_safe=config.template.trainer_safe, owns=own,
             sources=[s.spec for s in source_list(config)])
        for prefix, own in zip(prefixes, owns)]


_task_span = ray.remote(num_cpus=0)(task_span)  # a block's read tasks, where it lives


def feed(ds: ray.data.Dataset, writers: list, reach: list[tuple[int, int]],
         on_progress: Callable[[dict], None] | None, started: float, tasks: int = 0,
         uploads: list | None = None, wall: Phases | None = None) -> None:
    """Hand every block, in input order, to the writer(s) whose ``reach`` (``shards.task_reach``)
    its rows fall in; the writers' answers give the progress (of ``tasks`` read tasks), reported
    after every block (``sftprep.progress`` decides how often to show it), and the multipart
    uploads they started (added to ``uploads``). With one writer no routing is needed; with
    several, a zero-CPU task names each block's first and last read task. ``wall`` gets the
    wait for the first block (``first_block``)."""
    in_flight: deque = deque()
    spans: deque = deque()
    latest = [{} for _ in writers]

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            k, ref = in_flight.popleft()
            latest[k] = ray.get(ref)
            upload = latest[k].pop("upload", None)
            if uploads is not None and upload and tuple(upload) not in uploads:
                uploads.append(tuple(upload))
            if on_progress:
                total = {key: sum(p.get(key, 0) for p in latest) for key in latest[k]}
                on_progress({**total, "read_tasks_total": tasks,
                             "seconds": time.time() - started})

    def send(block_ref, targets) -> None:
        for k in targets:
            in_flight.append((k, writers[k].consume.remote(block_ref)))
        settle(MAX_BLOCKS_IN_FLIGHT * len(writers))

    def route(block_ref, span_ref) -> None:
        span = ray.get(span_ref)
        if span is not None:
            send(block_ref, [k for k, (a, b) in enumerate(reach)
                             if a <= span[1] and span[0] <= b])

    for bundle in ds.iter_internal_ref_bundles():
        if wall is not None and "first_block" not in wall.ns:
            wall.lap("first_block")
        for block_ref in bundle.block_refs:
            if len(writers) == 1:
                send(block_ref, [0])
                continue
            spans.append((block_ref, _task_span.remote(block_ref)))
            while len(spans) > MAX_BLOCKS_IN_FLIGHT:
                route(*spans.popleft())
    while spans:
        route(*spans.popleft())
    settle(0)
