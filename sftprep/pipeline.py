"""The Ray Data job: read → map_batches(Tokenize) on an actor pool → one ordered writer actor.

Order: ``preserve_order`` makes Ray Data hand out blocks in input order however many read tasks
and tokenizer actors ran; the driver passes block *references* (never the data) to the writer
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

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Callable, Iterator

import pyarrow as pa
import ray

import sftprep
from sftprep import tokenizer_files
from sftprep.config import BuildConfig, ConfigError, validate
from sftprep.encode import Setup, prepare
from sftprep.errors import Failed
from sftprep.ray_compat import (progress_bars, read_datasource, read_task,
                                with_object_store_limit)
from sftprep.sources import SCHEMA as RECORD_SCHEMA
from sftprep.shards import (assemble_manifest, shard_of_tasks, shard_prefix, task_ranges,
                            task_reach, task_span, unnamed_shards, write_manifest)
from sftprep.sink import abort_upload, pending_uploads
from sftprep.sources import (InputFile, ReadRange, auto_split_bytes, count_records,
                             expand_inputs, mixture_plan, parse_source, plan_reads, read_range)
from sftprep.storage import filesystem, is_remote, redact, resolve_options
from sftprep.template import load_tokenizer
from sftprep.tokenize import GUARD_EVERY, GUARD_LINES, Tokenize, TokenizeSpec
from sftprep.writer import (MANIFEST, REJECTS, STALE_ORDER, SUFFIXES, SFTWriter,
                            remove_stale, remove_temporary)

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


logger = logging.getLogger(__name__)


class BuildFailed(Failed):
    """The build could not finish (not the input's fault); the message is the one line to
    show. Nothing was published, and nothing it started is left pending."""


class _Signalled(BaseException):
    """Raised by this module's signal handlers in whatever Ray call the main thread is in; a
    BaseException, as KeyboardInterrupt, so Ray Data passes it on instead of logging it as an
    error of its own. The build turns it into its one-line error."""


class RuntimeLost(Failed):
    """The local Ray runtime this process started stopped under it (killed from outside)."""


# The one line for a lost local runtime, whoever says it: the build, or the job's stderr filter
# (``stderr_filter``) when Ray's core ended the process before the build could.
LOST_RUNTIME = "the local Ray runtime stopped during the job ({} exited); nothing written"


class LocalRuntimeWatch:
    """Between start and stop, watch the GCS and raylet of a local runtime this driver started.

    Killed from outside, the runtime leaves the driver blocked in Ray calls until Ray's core
    gives up on its GCS a minute later, or ends the process the moment a thread touches the
    dead raylet's object store, in either case without a word. Instead, the moment either
    exits, ``lost`` names it, ``on_lost`` cleans up what this node holds, and the main thread
    gets ``RuntimeLost`` by a signal of its own (SIGUSR2 while the watch runs), not by a
    simulated Ctrl-C: a job started in the background ignores SIGINT, which turned
    ``_thread.interrupt_main`` into a no-op. If the main thread is stuck in a call no signal
    reaches, the process ends after ``grace`` seconds (exit 1; the CLI's stderr filter says
    why). A cluster this driver joined (``ray job submit``) is not ours to watch.
    """

    WATCHED = ("gcs_server", "raylet")
    SIGNAL = signal.SIGUSR2

    def __init__(self, on_lost: Callable[[], None] | None = None, interval: float = 0.1,
                 grace: float = 10.0):
        self.interval, self.grace, self.on_lost = interval, grace, on_lost
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # no interrupt once stop() has returned
        self._previous = None
        self._processes: list = []

    def _find(self) -> list:
        node = ray._private.worker._global_node  # set only when this process started Ray
        running = node.all_processes if node is not None else {}
        return [(kind, info.process) for kind in self.WATCHED
                for info in running.get(kind, []) if info.process.poll() is None]

    def start(self) -> "LocalRuntimeWatch":
        """Watch the runtime this process started, or will start (it is looked for until then)."""
        if ray.is_initialized() and not self._find():
            return self  # a cluster this driver joined
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.SIGNAL, self._raise)
        threading.Thread(target=self._watch, name="ray-runtime-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        if self._previous is not None:
            signal.signal(self.SIGNAL, self._previous)
            self._previous = None

    def _raise(self, signum, frame) -> None:
        if self.lost:
            raise _Signalled(LOST_RUNTIME.format(self.lost))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._processes:
                self._processes = self._find()
            lost = next((kind for kind, p in self._processes if p.poll() is not None), None)
            if lost is None:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                self.lost = lost
            if self.on_lost is not None:
                with contextlib.suppress(Exception):
                    self.on_lost()
            # Only the main thread that started the watch is interrupted (a build run from
            # another thread of a long-lived process ends when its Ray calls fail).
            if self._previous is not None:
                signal.pthread_kill(threading.main_thread().ident, self.SIGNAL)
            if not self._stop.wait(self.grace):
                os._exit(1)
            return


@contextlib.contextmanager
def watched_runtime(on_lost: Callable[[], None] | None = None) -> Iterator[LocalRuntimeWatch]:
    """Run the body under a ``LocalRuntimeWatch``: a lost local runtime ends it with
    ``RuntimeLost`` (one line), whatever the body was doing."""
    watch = LocalRuntimeWatch(on_lost).start()
    try:
        yield watch
    except BaseException:
        if watch.lost:
            raise RuntimeLost(LOST_RUNTIME.format(watch.lost)) from None
        raise
    finally:
        watch.stop()


class BuildStopped(BuildFailed):
    """SIGTERM (``ray job stop``, a scheduler's stop) during the build."""


def _stop_on_sigterm():
    """From now on SIGTERM raises ``BuildStopped``, so the build's clean-up runs and the job
    ends non-zero in one line, not by Ray's handler's ``sys.exit`` without a word. Returns the
    handler to put back (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise _Signalled("SIGTERM")

    return signal.signal(signal.SIGTERM, stop)


def abandon_local_runtime() -> None:
    """Kill what is left of a lost local runtime (``ray.shutdown`` would wait on it)."""
    node = ray._private.worker._global_node
    if node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=False)


@contextlib.contextmanager
def _signals_ignored():
    """A second Ctrl-C or SIGTERM must not cut the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def tokenize_spec(config: BuildConfig) -> TokenizeSpec:
    t = config.template
    return TokenizeSpec(tokenizer=t.tokenizer, seq_length=t.seq_length, pad_token=t.pad_token,
                        chat_template=t.chat_template, train_on=t.train_on,
                        train_tool_calls=t.train_tool_calls, format=config.source.format,
                        columns=tuple(sorted(config.source.columns.items())),
                        trainer_safe=t.trainer_safe, overlong=t.overlong,
                        reasoning_turns=t.reasoning_turns, backend=t.backend)


def loaded_tokenizer(config: BuildConfig) -> tuple:
    """The HF tokenizer, the tokenizer, template and encoding backend every actor gets, and
    where its files came from, all decided here once (``encode.Setup``,
    ``tokenizer_files.Resolved``)."""
    t = config.template
    resolved = tokenizer_files.resolve(t.tokenizer, config.source.storage_options)
    tok = load_tokenizer(resolved.path, t.pad_token, t.chat_template)
    return tok, prepare(tok, t.backend), resolved


def local_absolute(prefix: str) -> str:
    """A local output's prefix made absolute: the writer actors' working directory need not be
    the driver's, and Pai's run scripts start in their own example directory, so the trainer's
    --data-path must not be relative either. A URL stays as it is."""
    return prefix if is_remote(prefix) else os.path.abspath(prefix)


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
    setup_ref = [ray.put(setup or loaded_tokenizer(config)[1])]
    return ds.map_batches(stage, fn_constructor_args=(spec, setup_ref),
                          batch_size=config.run.batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=actor_cpus)


def output_prefixes(config: BuildConfig) -> list[str]:
    """The document prefix of each writer: P_text_document, or P_<k>_text_document; absolute
    for a local output (``local_absolute``)."""
    if config.output.shards == 1:
        return [local_absolute(config.document_prefix)]
    return [local_absolute(shard_prefix(config.output.prefix, k))
            for k in range(config.output.shards)]


def check_output_free(config: BuildConfig) -> None:
    fs, path = filesystem(config.document_prefix, config.source.storage_options)
    existing = [path + MANIFEST] if fs.exists(path + MANIFEST) else []
    for prefix in output_prefixes(config):
        fs, path = filesystem(prefix, config.source.storage_options)
        existing += [path + s for s in SUFFIXES if fs.exists(path + s)]
    if existing and not config.output.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it")


def _is_output_file(config: BuildConfig, url: str) -> bool:
    """Whether ``url`` is one of the files a build at ``config.output.prefix`` writes (any
    number of shards)."""
    names = "|".join(re.escape(s) for s in (*SUFFIXES, MANIFEST, REJECTS))
    pattern = re.escape(config.output.prefix) + rf"(_\d+)?_text_document({names})"
    return re.fullmatch(pattern, url) is not None


def abort_uploads(config: BuildConfig, options: dict, started: list[tuple[str, str]]) -> None:
    """Abort the uploads this build started (``started``, in that order), then any other still
    pending on its output files (one a writer started but could not report)."""
    for url, upload in [*started, *(u for u in _pending_output_uploads(config, options)
                                    if u not in started)]:
        with contextlib.suppress(Exception):  # completed, or already aborted by its writer
            abort_upload(url, upload, options)


def _pending_output_uploads(config: BuildConfig, options: dict) -> list[tuple[str, str]]:
    if not is_remote(config.output.prefix):
        return []
    try:
        found = pending_uploads(config.output.prefix, options)
    except Exception:  # a store without a listing of uploads: nothing to find
        return []
    return [(url, upload) for url, upload in found if _is_output_file(config, url)]


def remove_unnamed_shards(config: BuildConfig, options: dict) -> None:
    """Remove the shards at this prefix that no manifest names (``shards.unnamed_shards``):
    a sharded build that stopped before its manifest left them, saying so in one line."""
    fs, path = filesystem(config.document_prefix, options)
    manifest = {}
    if fs.exists(path + MANIFEST):
        with fs.open(path + MANIFEST, "rb") as f:
            manifest = json.load(f)

    def has_files(prefix: str) -> bool:
        fs, path = filesystem(prefix, options)
        return any(fs.exists(path + s) for s in STALE_ORDER)

    unnamed = unnamed_shards(config.output.prefix, manifest, has_files)
    for prefix in unnamed:
        remove_stale(prefix, options)
    if unnamed:
        logger.warning(f"[sftprep] removed {len(unnamed)} shard{'s' * (len(unnamed) != 1)} "
                       f"that no manifest names (a build stopped before it finished): "
                       f"{', '.join(unnamed)}")


def abort_stale_uploads(config: BuildConfig, options: dict) -> None:
    """Abort the uploads an earlier build at this prefix left pending (a driver killed
    outright cannot abort its own), saying so in one line."""
    stale = _pending_output_uploads(config, options)
    for url, upload in stale:
        abort_upload(url, upload, options)
    if stale:
        names = ", ".join(sorted({url for url, _ in stale}))
        logger.warning(f"[sftprep] aborted {len(stale)} pending upload"
                       f"{'s' * (len(stale) != 1)} an earlier build left unfinished: {names}")


def build(config: BuildConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run the whole build; return the manifest (whose ``summary`` has the figures)."""
    validate(config)
    started = time.time()
    files = expand_inputs(config.source.inputs, config.source.storage_options)
    remove_unnamed_shards(config, resolve_options([config.document_prefix],
                                                  config.source.storage_options))
    check_output_free(config)
    tokenizer = in_background(lambda: loaded_tokenizer(config))
    ensure_ray(config.run.verbose)  # Ray's start is mostly waiting: the tokenizer loads meanwhile
    tok, setup, resolved = tokenizer()
    plan = read_plan(config, files)
    options = resolve_options([config.document_prefix], config.source.storage_options)
    task_shard = shard_of_tasks([r.size * r.select.keep // r.select.total if r.select else r.size
                                 for r in plan], config.output.shards)
    abort_stale_uploads(config, options)
    writers = start_writers(config, files, plan, tok, options, task_shard)
    leftovers = ray.get([w.leftovers.remote() for w in writers])
    writer_pids = [pid for pid, _ in leftovers]
    temporary = [p for _, paths in leftovers for p in paths]
    uploads: list[tuple[str, str]] = []  # (url, upload id) the writers started, in that order

    def node_lost() -> None:  # no Ray call can answer now; the writers' files are on this node
        stop_processes(writer_pids)  # a writer outlives its raylet a moment: stop it first
        remove_temporary(temporary)
        abort_uploads(config, options, uploads)

    watch = LocalRuntimeWatch(on_lost=node_lost).start()
    sigterm = _stop_on_sigterm()
    try:
        reach = task_reach([r.pass_key for r in plan], task_ranges(task_shard, len(writers)))
        feed(tokenized_dataset(config, plan, setup=setup), writers, reach, on_progress, started,
             len(plan), uploads)
        elapsed = time.time() - started
        checks = " and ".join([*(["HF re-encoded"] if setup.backend == "fast" else []),
                               *(["Jinja re-rendered"] if setup.renderer == "traced" else [])])
        extra = {
            "sftprep_version": sftprep.__version__,
            "ray_version": ray.__version__,
            "created_unix": round(started, 3),
            "elapsed_seconds": round(elapsed, 3),
            "seed": config.source.seed,
            "sources": sources_section(config, files, plan),
            "inputs": [{"url": f.url, "bytes": f.size, "source": f.source,
                        "read_tasks": sum(r.file == i for r in plan)}
                       for i, f in enumerate(files)],
            "tokenizer": {"path": config.template.tokenizer,
                          "source": {**resolved.source,
                                     "local_dir": os.path.abspath(resolved.path)},
                          "files": resolved.files,
                          "sha256": tokenizer_files.fingerprint(resolved.files, tok),
                          "pad_token": tok.pad_token, "pad_id": tok.pad_token_id,
                          "vocab_size": len(tok), **setup.describe(),
                          **({"guard": f"{checks} each actor's first batch, the first "
                                       f"{GUARD_LINES} lines of every file and 1 in "
                                       f"{GUARD_EVERY} other samples: all identical"}
                             if checks else {})},
            "config": redact(asdict(config)),
        }
        manifest = finish_shards(config, writers, extra, options)
    except BaseException as error:
        if watch.lost:  # no Ray call can answer now; the watch has cleaned up
            raise RuntimeLost(LOST_RUNTIME.format(watch.lost)) from None
        with _signals_ignored():
            # What the driver can do itself first: a stop (SIGTERM) is followed by SIGKILL
            # within seconds (ray job stop: 3 s), and the writers die with the driver.
            remove_temporary(temporary)
            abort_uploads(config, options, uploads)
            with contextlib.suppress(Exception):  # a writer itself may be what died
                ray.get([w.abort.remote() for w in writers], timeout=60)
        if isinstance(error, ray.exceptions.RayActorError):
            raise BuildFailed("a writer's process or node was lost during the build; nothing "
                              "published, its uploads aborted") from None
        if isinstance(error, _Signalled):
            raise BuildStopped("the build was stopped (SIGTERM, e.g. ray job stop); nothing "
                               "published, its uploads aborted") from None
        raise
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        watch.stop()
        if not watch.lost:
            for w in writers:
                ray.kill(w, no_restart=True)
    return manifest


def in_background(fn: Callable[[], object]) -> Callable[[], object]:
    """Start ``fn`` in a daemon thread; the returned function waits for its result (raising
    what it raised)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller, raised there
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]
    return result


def stop_processes(pids: list[int], wait: float = 10.0) -> None:
    """SIGKILL ``pids`` and wait until they are gone: a process killed in the middle of a system
    call (creating a file, say) finishes that call first, after which its files can be removed
    for good."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    for pid in pids:
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def start_writers(config: BuildConfig, files: list[InputFile], plan: list[ReadRange], tok,
                  options: dict, task_shard: list[int]) -> list:
    """One writer actor per shard, on the driver's node for a local output, else spread."""
    if is_remote(config.document_prefix):
        placement = "SPREAD"
    else:
        placement = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
    prefixes = output_prefixes(config)
    owns = [None] if len(prefixes) == 1 else task_ranges(task_shard, len(prefixes))
    return [ray.remote(SFTWriter).options(
        num_cpus=0, max_restarts=0, scheduling_strategy=placement,
    ).remote(prefix, [f.url for f in files], config.template.seq_length, tok.pad_token_id,
             config.packing.mode, config.packing.window, config.source.on_error, options,
             config.output.spill_dir, len(tok), plan,
             trainer_safe=config.template.trainer_safe, owns=own,
             sources=[s.spec for s in source_list(config)])
        for prefix, own in zip(prefixes, owns)]


_task_span = ray.remote(num_cpus=0)(task_span)  # a block's read tasks, where it lives


def feed(ds: ray.data.Dataset, writers: list, reach: list[tuple[int, int]],
         on_progress: Callable[[dict], None] | None, started: float, tasks: int = 0,
         uploads: list | None = None) -> None:
    """Hand every block, in input order, to the writer(s) whose ``reach`` (``shards.task_reach``)
    its rows fall in; the writers' answers give the progress (of ``tasks`` read tasks), reported
    after every block (``sftprep.progress`` decides how often to show it), and the multipart
    uploads they started (added to ``uploads``). With one writer no routing is needed; with
    several, a zero-CPU task names each block's first and last read task."""
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


def remove_other_shards(config: BuildConfig, options: dict) -> None:
    """Remove the shards an earlier build at this prefix left beyond this build's own
    (``P_k_text_document`` from k = ``shards``; every one for an unsharded build): beside the
    new output they would look like a part of it. A build writes its shards 0..N-1, so the
    first number without files ends the search."""
    k = config.output.shards if config.output.shards > 1 else 0
    while True:
        prefix = shard_prefix(config.output.prefix, k)
        fs, path = filesystem(prefix, options)
        if not any(fs.exists(path + s) for s in STALE_ORDER):
            return
        remove_stale(prefix, options)
        k += 1


def finish_shards(config: BuildConfig, writers: list, extra: dict, options: dict) -> dict:
    """Seal every writer (one, or a shard each), remove the old output's manifest and files
    (unsharded or shards beyond this build's), publish the writers' files, then write the one
    manifest naming them, last."""
    summaries = ray.get([w.seal.remote(extra["elapsed_seconds"]) for w in writers])
    remove_stale(config.document_prefix, options)
    remove_other_shards(config, options)
    ray.get([w.publish.remote() for w in writers])
    outputs = ray.get([w.outputs.remote() for w in writers])
    figures = ray.get([w.trainer_figures.remote() for w in writers])
    manifest = assemble_manifest(extra, summaries, figures, output_prefixes(config), outputs,
                                 config.template.seq_length, config.document_prefix + MANIFEST,
                                 asdict(config.trainer))
    write_manifest(config.document_prefix + MANIFEST, manifest, options,
                   config.output.spill_dir)
    return manifest
