"""The job's stderr through a small process that drops Ray's native log lines and outlives the job.

Why a process and not a thread of the job: when the local Ray runtime dies, Ray's core ends
the job's process with ``_exit(1)`` the moment any of its threads touches the dead raylet's
object store ("The connection to the plasma store is failed. Terminate the process."), often
before the job's own watcher (``runtime.LocalRuntimeWatch``) has noticed. That native line is
one of those dropped here, and a filter thread dies with the process: exit 1, nothing on
stderr. The filter process survives it, and keeps an eye on the job's local runtime (the
``gcs_server`` and ``raylet`` children of the job): when the job's stderr closes without the
job having said it is done (``finish``) while one of them has gone, it prints the job's one
line for it. A job killed from outside (SIGKILL) leaves its runtime running: nothing is added.

    stderr = start("error: the local Ray runtime stopped ({} exited); nothing written")
    ...                # fd 2 goes through the filter
    finish(stderr)     # the job is done: fd 2 is the terminal again
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

# Ray's C++ core writes its log lines ("[2026-01-01 12:00:00,000 E 123 123] core_worker.cc:..")
# to the driver's log file in the session directory and, from warnings up, to stderr as well.
RAY_NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [IWE] \d+ \d+\] ")
DONE = b"\x00sftprep: stderr done\n"  # the job's last word said; filter on to the end
QUIT = b"\x00sftprep: stderr quit\n"  # the same, and fd 2 goes back to the terminal: stop
RUNTIME = ("gcs_server", "raylet")  # the local runtime's processes, in the order reported
SCAN_SECONDS = 0.2  # how often the filter looks for the job's runtime processes


@dataclass
class Filter:
    terminal: int  # a copy of the terminal's fd, put back on fd 2 at the end
    process: subprocess.Popen


def start(lost_line: str) -> Filter:
    """Route fd 2 through the filter process; ``lost_line`` (with ``{}`` for the process that
    exited) is what it prints if the job's local runtime is lost and the job cannot say so."""
    read_fd, write_fd = os.pipe()
    terminal = os.dup(2)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(
        [sys.executable, "-m", "sftprep.stderr_filter", str(os.getpid()), lost_line],
        stdin=read_fd, stdout=terminal, stderr=terminal, env=env, close_fds=True,
        start_new_session=True)  # Ctrl-C is for the job; the filter ends when the job's fd 2 does
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    return Filter(terminal, process)


def finish(f: Filter, restore: bool = True, wait: float = 5.0) -> None:
    """Tell the filter the job has said its last word, put the terminal back on fd 2, and let
    the filter pass on what it still holds. ``restore=False`` (the process is about to
    ``os._exit`` with Ray's threads still logging): fd 2 stays on the filter to the end."""
    sys.stderr.flush()
    _write_all(2, QUIT if restore else DONE)
    if not restore:
        return
    os.dup2(f.terminal, 2)
    os.close(f.terminal)
    try:
        f.process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


def runtime_children(parent: int) -> dict[int, str]:
    """``{pid: name}`` of ``parent``'s running ``RUNTIME`` children (from /proc)."""
    pids: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
    except OSError:  # no children lists in this kernel: every process's parent
        pids = {int(e) for e in os.listdir("/proc") if e.isdigit()}
    found = {}
    for pid in pids:
        stat = _stat(pid)
        if stat and stat[2] == parent and stat[0] in RUNTIME and stat[1] not in "ZX":
            found[pid] = stat[0]
    return found


def _stat(pid: int) -> tuple[str, str, int] | None:
    """``(name, state, parent pid)`` of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    name = data[data.index(b"(") + 1:data.rindex(b")")].decode(errors="replace")
    state, ppid = data[data.rindex(b")") + 2:].split()[:2]
    return name, state.decode(), int(ppid)


def _gone(pid: int, name: str) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] != name or stat[1] in "ZX"


# What Ray's core says as it ends a process whose runtime is gone ("... Terminate the process.",
# "... The program will terminate.", "Exiting because the Raylet IPC connection failed ...").
RAY_ENDS_PROCESS = re.compile(rb"[Tt]erminat|[Ee]xiting because|will exit")


def pump(job: int, lost_line: str, src: int = 0, dst: int = 1) -> None:
    """The filter process: pass ``src`` to ``dst`` line by line without Ray's native lines;
    at the end, print ``lost_line`` if the job went without its ``DONE`` after its runtime.

    After its runtime, not before: a job killed from outside takes its runtime with it (Ray
    starts it bound to the job), so the runtime's end must be seen first (a pidfd wakes this
    process the moment it exits) or Ray's core must have said that it ends the job for it.
    """
    seen: dict[int, str] = {}
    watched: dict[int, str] = {}  # pidfd -> name
    lost: str | None = None
    ray_ended = False
    pending, done, quit, next_scan = b"", False, False, 0.0
    while not quit:
        now = time.monotonic()
        if now >= next_scan and set(seen.values()) != set(RUNTIME) and os.path.isdir("/proc"):
            for pid, name in runtime_children(job).items():
                if pid not in seen and hasattr(os, "pidfd_open"):
                    try:
                        watched[os.pidfd_open(pid)] = name
                    except OSError:
                        pass
                seen[pid] = name
            next_scan = now + SCAN_SECONDS
        ready = select.select([src, *watched], [], [], SCAN_SECONDS)[0]
        data = os.read(src, 1 << 16) if src in ready else None
        if data == b"":
            break  # the job ended: a runtime that ended in the same instant went with it
        for fd in ready:
            if fd != src:
                name = watched.pop(fd)
                lost = lost or name
                os.close(fd)
        if not data:
            continue
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            line += b"\n"
            if line in (DONE, QUIT):  # after DONE, what Ray writes is filtered to the end
                done, quit = True, line == QUIT
                if quit:
                    break
            elif not RAY_NATIVE_LOG_LINE.match(line):
                _write_all(dst, line)
            elif RAY_ENDS_PROCESS.search(line):
                ray_ended = True
    if pending and not RAY_NATIVE_LOG_LINE.match(pending):
        _write_all(dst, pending)
    if not done and not lost and ray_ended:
        lost = next((name for name in RUNTIME for pid, n in seen.items()
                     if n == name and _gone(pid, n)), None)
    if not done and lost:
        _write_all(dst, (lost_line.format(lost) + "\n").encode())


if __name__ == "__main__":
    # Stopping the job (Ctrl-C, ray job stop's SIGTERM to the job's process tree) must not
    # stop its stderr before the job's last line: the filter ends when the job's fd 2 closes.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    pump(int(sys.argv[1]), sys.argv[2])
