"""The build's budget: the tokenizer stage and the writer count their own thread's CPU per
named phase, and the driver its wall time per step, so the manifest's ``timing`` attributes a
build's seconds to what spent them (docs/performance.md); what no stage counts is Ray's
(``bench/bench.py`` shows it per process).
"""

from __future__ import annotations

import time


class Phases:
    """Nanoseconds per phase on ``clock`` (default: the calling thread's CPU): each ``lap``
    counts the time since the previous one (or ``restart``) to a phase. ``names`` are the
    phases reported even when nothing was counted to them, in their order; others are added in
    the order of their first lap."""

    def __init__(self, names: tuple[str, ...] = (), clock=time.thread_time_ns):
        self.ns = dict.fromkeys(names, 0)
        self.read = clock
        self.clock = clock()

    def restart(self) -> None:
        """Count nothing of the time since the last lap."""
        self.clock = self.read()

    def lap(self, phase: str) -> None:
        now = self.read()
        self.ns[phase] = self.ns.get(phase, 0) + now - self.clock
        self.clock = now

    def seconds(self) -> dict[str, float]:
        return seconds(self.ns, self.ns.values())


def seconds(names, nanoseconds) -> dict[str, float]:
    """``{phase: seconds}`` of ``nanoseconds`` in the order of ``names``."""
    return {name: round(int(ns) / 1e9, 3) for name, ns in zip(names, nanoseconds)}
