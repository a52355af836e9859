"""The one exception type of sftprep's user errors, and how an interface finds one.

Every error a user can fix (a bad option, input, record, template or tokenizer) is an ``Error``:
its message is one line naming what the user gave and how to fix it. The Python API raises it;
the command line prints it as ``error: <message>`` and exits 2. Anything else is a bug and keeps
its traceback. Ray re-raises an error from a task or actor wrapped, with the original as
``cause``; ``user_error`` looks through that wrapping, so both interfaces answer alike.
"""

from __future__ import annotations


class Error(Exception):
    """A user error; ``str(e)`` is the one line the command line prints after ``error:``."""


class Invalid(Error):
    """Built files break the SFT layout (``verify``); the command line exits 1 for these."""


class Failed(Error):
    """A build that could not finish through no fault of its input: its Ray runtime or a
    writer was lost, or it was stopped. Nothing was published and nothing it started is left
    pending; the command line exits 1."""


def user_error(e: BaseException) -> Error | None:
    """The user error ``e`` is or wraps (Ray's task errors carry it as ``cause``), else None.
    A missing file the user named counts as one."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, Error):
        return cause
    if isinstance(cause, FileNotFoundError):
        return Error(str(cause))
    return None


def did_you_mean(given: str, choices) -> str:
    """``"; did you mean X?"`` for the closest of ``choices``, or nothing when none is close."""
    import difflib

    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
