"""The Ray runtime a job runs on, and the processes around it: joining or starting Ray, watching
a local runtime this driver started (``LocalRuntimeWatch``), SIGTERM as a stop, and the one-line
errors a build or a stats job ends with when its runtime, a writer or the job itself is lost
(``RuntimeLost``, ``BuildFailed``, ``BuildStopped``). What to clean up is the caller's
(``outputs``); this module only says when, and with which signals held off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable, Iterator

import ray

from sftprep.errors import Failed


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


@contextlib.contextmanager
def guarded(on_lost: Callable[[], None], clean_up: Callable[[], None],
            release: Callable[[], None]) -> Iterator[LocalRuntimeWatch]:
    """Run a build's body under a ``LocalRuntimeWatch`` (``on_lost`` cleans up when the local
    runtime is lost) with SIGTERM as a stop. Any failure runs ``clean_up`` with signals held off
    and ends in one line: ``RuntimeLost``, ``BuildFailed`` (a writer's process or node lost),
    ``BuildStopped`` (SIGTERM), or the error as raised. ``release`` runs last, unless the
    runtime is lost (no Ray call can answer then)."""
    watch = LocalRuntimeWatch(on_lost=on_lost).start()
    sigterm = _stop_on_sigterm()
    try:
        yield watch
    except BaseException as error:
        if watch.lost:  # no Ray call can answer now; the watch has cleaned up
            raise RuntimeLost(LOST_RUNTIME.format(watch.lost)) from None
        with _signals_ignored():
            clean_up()
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
            release()
