"""The build's CPU budget: the tokenizer stage and the writer count their own thread's CPU per
named phase, so the manifest's ``timing`` attributes a build's CPU-seconds to what spent them
(docs/performance.md); what no stage counts is Ray's (``bench/bench.py`` shows it per process).
"""

from __future__ import annotations

import time


class Phases:
    """CPU nanoseconds of the calling thread per phase: each ``lap`` counts the CPU since the
    previous one (or ``restart``) to a phase."""

    def __init__(self, names: tuple[str, ...]):
        self.ns = dict.fromkeys(names, 0)
        self.clock = time.thread_time_ns()

    def restart(self) -> None:
        """Count nothing of what this thread did since the last lap."""
        self.clock = time.thread_time_ns()

    def lap(self, phase: str) -> None:
        now = time.thread_time_ns()
        self.ns[phase] += now - self.clock
        self.clock = now


def seconds(names: tuple[str, ...], nanoseconds) -> dict[str, float]:
    """``{phase: CPU seconds}`` of ``nanoseconds`` in the order of ``names``."""
    return {name: round(int(ns) / 1e9, 3) for name, ns in zip(names, nanoseconds)}
