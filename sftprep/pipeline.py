"""The Ray Data job: read → map_batches(Tokenize) on an actor pool → one ordered writer actor.

Order: ``preserve_order`` makes Ray Data hand out blocks in input order however many read tasks
and tokenizer actors ran; the driver passes block *references* (never the data) to the single
writer actor, one call at a time in that order, and the writer checks the order itself. So the
output bytes depend only on the input and the configuration.

CPU budget: a pool that claims every CPU starves the read tasks and the job stalls, so each
tokenizer actor claims at most 90% of a CPU share and read tasks claim a tenth of a CPU.
Memory: the object store holds at most ``STORE_BLOCKS_PER_CPU`` blocks per CPU, so reading
never runs far ahead of tokenizing and memory stays flat as the input grows.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Callable, Iterator

import pyarrow as pa
import ray

import sftprep
from sftprep.config import BuildConfig, ConfigError, validate
from sftprep.encode import Setup, prepare
from sftprep.sources import SCHEMA as RECORD_SCHEMA
from sftprep.sources import (InputFile, ReadRange, auto_split_bytes, expand_inputs, plan_reads,
                             read_range)
from sftprep.storage import filesystem, redact, resolve_options
from sftprep.template import load_tokenizer, tokenizer_fingerprint
from sftprep.tokenize import GUARD_EVERY, GUARD_LINES, Tokenize, TokenizeSpec
from sftprep.writer import MANIFEST, SUFFIXES, SFTWriter, remove_temporary

log = logging.getLogger("sftprep")

READ_CPUS = 0.1
ACTOR_CPU_SHARE = 0.9
MAX_BLOCKS_IN_FLIGHT = 4
# Ray Data merges a read task's output into blocks of up to 128 MiB by default: hundreds of
# thousands of records per tokenizer task, coarse progress and a long redo when an actor dies.
BLOCK_BYTES = 8 << 20
PROGRESS_SECONDS = 10.0
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
            meta = ray.data.block.BlockMetadata(num_rows=None, size_bytes=r.size,
                                                input_files=[r.url], exec_stats=None)
            tasks.append(ray.data.ReadTask(read, meta, schema=RECORD_SCHEMA))
        return tasks

    def get_name(self) -> str:
        return "ReadSFTRecords"


def ensure_ray(verbose: bool = False) -> None:
    """Join the cluster of ``ray job submit`` (or RAY_ADDRESS), else start a local runtime.

    A local runtime starts without the dashboard: a dozen processes, ~1 GB of RSS and CPU
    that a one-machine build wants for tokenizing (a cluster keeps its own).
    Unless ``verbose``, the workers' and Ray's own processes' output stays in the session's log
    files instead of being copied to the driver's terminal, and Ray's and Ray Data's loggers
    print errors only (Ray Data's log file in the session keeps everything).
    """
    if not ray.is_initialized():
        ray.init(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR,
                 include_dashboard=False)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


class RuntimeLost(RuntimeError):
    """The local Ray runtime this process started stopped under it (killed from outside)."""


class LocalRuntimeWatch:
    """Between start and stop, watch the GCS and raylet of a local runtime this driver started.

    Killed from outside, the runtime leaves the driver blocked in Ray calls until Ray's core
    gives up on its GCS a minute later and ends the process without a word. Instead, the
    moment either exits, ``lost`` names it and the main thread is interrupted.
    A cluster this driver joined (``ray job submit``) is not ours to watch.
    """

    WATCHED = ("gcs_server", "raylet")

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.lost: str | None = None
        self._stop = threading.Event()
        node = ray._private.worker._global_node  # set only when this process started Ray
        running = node.all_processes if node is not None else {}
        self._processes = [(kind, info.process) for kind in self.WATCHED
                           for info in running.get(kind, []) if info.process.poll() is None]

    def start(self) -> "LocalRuntimeWatch":
        if self._processes:
            threading.Thread(target=self._watch, name="ray-runtime-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            for kind, process in self._processes:
                if process.poll() is not None:
                    self.lost = kind
                    _thread.interrupt_main()
                    return


def abandon_local_runtime() -> None:
    """Kill what is left of a lost local runtime (``ray.shutdown`` would wait on it)."""
    node = ray._private.worker._global_node
    if node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=False)


@contextlib.contextmanager
def _sigint_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def worker_env(verbose: bool) -> dict:
    """Environment of the tokenizer actors: one thread each; transformers quiet unless asked."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not verbose:
        env.update(TRANSFORMERS_VERBOSITY="error", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return env


def tokenize_spec(config: BuildConfig) -> TokenizeSpec:
    t = config.template
    return TokenizeSpec(tokenizer=t.tokenizer, seq_length=t.seq_length, pad_token=t.pad_token,
                        chat_template=t.chat_template, train_on=t.train_on,
                        train_tool_calls=t.train_tool_calls, format=config.source.format,
                        columns=tuple(sorted(config.source.columns.items())),
                        trainer_safe=t.trainer_safe, backend=t.backend)


def tokenizer_setup(config: BuildConfig, tok=None) -> Setup:
    """The tokenizer, template and encoding backend every actor gets, decided here once."""
    t = config.template
    tok = tok or load_tokenizer(t.tokenizer, t.pad_token, t.chat_template)
    setup = prepare(tok, t.backend)
    log.info("[sftprep] tokenizer backend: %s (%s)", setup.backend, setup.reason)
    return setup


def cluster_cpus() -> float:
    return ray.cluster_resources().get("CPU", 1)


def read_plan(config: BuildConfig, files: list[InputFile]) -> list[ReadRange]:
    """The read tasks: large files split in ranges of ``source.split_bytes`` (default: enough
    ranges for every CPU of the cluster, see ``sources.auto_split_bytes``)."""
    split = config.source.split_bytes
    if split is None:
        split = auto_split_bytes(files, cluster_cpus())
    return plan_reads(files, split, resolve_options([f.url for f in files],
                                                    config.source.storage_options))


def record_dataset(config: BuildConfig, plan: list[ReadRange]) -> ray.data.Dataset:
    """The read stage: raw records in input order.

    The settings go on the current DataContext before the dataset exists: a dataset keeps a
    copy of the context it was made with, and later stages inherit that copy.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(2, int(cluster_cpus())) * STORE_BLOCKS_PER_CPU * BLOCK_BYTES)
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.enable_progress_bars = config.run.progress
    options = resolve_options([r.url for r in plan], config.source.storage_options)
    return ray.data.read_datasource(
        RecordSource(plan, options, config.run.block_records),
        num_cpus=READ_CPUS)


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
        urls.get(i, "") for i in range(max(urls, default=-1) + 1)))
    # One copy of the setup (~8 MB for a 150k vocabulary) in the object store for every actor,
    # passed inside a list so Ray hands the reference, not a copy per actor's arguments.
    setup_ref = [ray.put(setup or tokenizer_setup(config))]
    return ds.map_batches(stage, fn_constructor_args=(spec, setup_ref),
                          batch_size=config.run.batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=actor_cpus,
                          runtime_env={"env_vars": worker_env(config.run.verbose)})


def check_output_free(config: BuildConfig) -> None:
    prefix = config.document_prefix
    fs, path = filesystem(prefix, config.source.storage_options)
    existing = [path + s for s in SUFFIXES + (MANIFEST,) if fs.exists(path + s)]
    if existing and not config.output.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it")


def build(config: BuildConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run the whole build; return the manifest (whose ``summary`` has the figures)."""
    validate(config)
    started = time.time()
    files = expand_inputs(config.source.inputs, config.source.storage_options)
    check_output_free(config)
    tok = load_tokenizer(config.template.tokenizer, config.template.pad_token,
                         config.template.chat_template)
    setup = tokenizer_setup(config, tok)
    ensure_ray(config.run.verbose)
    plan = read_plan(config, files)
    here = ray.get_runtime_context().get_node_id()
    writer = ray.remote(SFTWriter).options(
        num_cpus=0, max_restarts=0,
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            here, soft=False),
    ).remote(config.document_prefix, [f.url for f in files], config.template.seq_length,
             tok.pad_token_id, config.packing.mode, config.packing.window,
             config.source.on_error,
             resolve_options([config.document_prefix], config.source.storage_options),
             config.output.spill_dir, len(tok), [r.file for r in plan],
             trainer_safe=config.template.trainer_safe)
    temporary = ray.get(writer.temporary_paths.remote())
    watch = LocalRuntimeWatch().start()
    try:
        in_flight: deque = deque()
        last_report = None  # the first block written is reported, then every PROGRESS_SECONDS

        def wait_until(left: int) -> None:
            nonlocal last_report
            while len(in_flight) > left:
                progress = ray.get(in_flight.popleft())
                if on_progress and (last_report is None
                                    or time.time() - last_report > PROGRESS_SECONDS):
                    on_progress({**progress, "seconds": time.time() - started})
                    last_report = time.time()

        for bundle in tokenized_dataset(config, plan, setup=setup).iter_internal_ref_bundles():
            for block_ref in bundle.block_refs:
                in_flight.append(writer.consume.remote(block_ref))
                wait_until(MAX_BLOCKS_IN_FLIGHT)
        wait_until(0)
        elapsed = time.time() - started
        extra = {
            "sftprep_version": sftprep.__version__,
            "ray_version": ray.__version__,
            "created_unix": round(started, 3),
            "elapsed_seconds": round(elapsed, 3),
            "inputs": [{"url": f.url, "bytes": f.size,
                        "read_tasks": sum(r.file == i for r in plan)}
                       for i, f in enumerate(files)],
            "tokenizer": {"path": config.template.tokenizer,
                          "sha256": tokenizer_fingerprint(config.template.tokenizer, tok),
                          "pad_token": tok.pad_token, "pad_id": tok.pad_token_id,
                          "vocab_size": len(tok), **setup.describe(),
                          **({"guard": f"HF re-encoded each actor's first batch, the first "
                                       f"{GUARD_LINES} lines of every file and 1 in "
                                       f"{GUARD_EVERY} other samples: all identical"}
                             if setup.backend == "fast" else {})},
            "config": redact(asdict(config)),
        }
        manifest = ray.get(writer.finish.remote(extra))
    except BaseException:
        if watch.lost:  # no Ray call can answer now; the writer's files are on this node
            remove_temporary(temporary)
            raise RuntimeLost(f"the local Ray runtime stopped during the build ({watch.lost} "
                              "exited); nothing written") from None
        with _sigint_ignored():  # a second Ctrl-C must not cut the clean-up short
            try:
                ray.get(writer.abort.remote(), timeout=60)
            except Exception:  # the writer itself may be what died
                remove_temporary(temporary)
        raise
    finally:
        watch.stop()
        if not watch.lost:
            ray.kill(writer, no_restart=True)
    return manifest
