"""Library noise hidden while a job runs (unless ``--verbose``), and put back afterwards.

A notebook kernel and a command see the same quiet job: transformers' advisories ("PyTorch was
not found") and warnings; Ray's Python loggers below errors (its info lines, "Missing
packages: ['ipywidgets']"); Ray's native core, whose log lines ("[2026-01-01 12:00:00,000 E 123
123] core_worker.cc:..") go to fd 2 as well as to the session's python-core-driver log (dropped by
``stderr_filter``, a process that also says the one line for a lost runtime); and
tqdm's warning without ipywidgets. Everything changed here is restored on the way out, so a
long-lived process keeps its own settings. The workers' output: ``runtime.ensure_ray``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
LOGGERS = ("ray", "ray.data", "transformers")


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Quiet inside (nothing changes when ``verbose``); Ray's and transformers' loggers keep
    what they had on the way out either way (a job sets them: ``runtime.ensure_ray``)."""
    with contextlib.nullcontext() if verbose else imports():
        import ray  # noqa: F401  (its loggers exist from here: saved below, as found)
        import ray.data  # noqa: F401
    # transformers' logger as it was; one its import sets up here gets the level it would have
    # had without ENVIRONMENT (its handler stays: transformers adds it once per process)
    had_transformers = "transformers" in sys.modules
    saved_loggers = [_logger_state(logging.getLogger(n)) for n in LOGGERS
                     if n != "transformers" or had_transformers]
    saved_env = {k: os.environ.get(k) for k in ENVIRONMENT}
    stack = contextlib.ExitStack()
    try:
        if not verbose:
            for k, v in ENVIRONMENT.items():  # read by transformers when it loads, and by
                os.environ.setdefault(k, v)     # every process started from here
            logging.getLogger("ray").setLevel(logging.ERROR)
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="IProgress not found")
            from sftprep import stderr_filter
            from sftprep.runtime import LOST_RUNTIME, RuntimeLost

            f = stderr_filter.start("error: " + LOST_RUNTIME)
            # After a lost runtime Ray's threads log on until the process ends: keep filtering
            stack.push(lambda kind, e, tb: stderr_filter.finish(
                f, restore=not isinstance(e, RuntimeLost)))
        with stack:
            yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for state in saved_loggers:
            _restore_logger(*state)
        if not had_transformers and "transformers" in sys.modules and not verbose:
            level = os.environ.get("TRANSFORMERS_VERBOSITY", "warning").upper()
            logging.getLogger("transformers").setLevel(getattr(logging, level, logging.WARNING))


@contextlib.contextmanager
def imports():
    """Import quietly: Ray's modules log at INFO as they load in a notebook ("Missing packages:
    ['ipywidgets']"), and tqdm warns when its notebook bar lacks ipywidgets."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="IProgress not found")
            yield
    finally:
        logging.disable(previous)


def _logger_state(lg: logging.Logger) -> tuple:
    return lg, lg.level, list(lg.handlers), [(h, h.level, h.formatter) for h in lg.handlers]


def _restore_logger(lg: logging.Logger, level: int, handlers: list, states: list) -> None:
    lg.setLevel(level)
    lg.handlers[:] = handlers
    for h, h_level, formatter in states:
        h.setLevel(h_level)
        h.setFormatter(formatter)
