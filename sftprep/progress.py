"""sftprep's own progress while a build runs: read tasks done of all, with the figures so far.

On a terminal and in a notebook it is one tqdm bar (a widget in Jupyter with ipywidgets); piped or
redirected, a plain line every ``LINE_SECONDS``. The build's final figures are the last update,
so the last line agrees with the summary (a packer holds samples back until the end, so the
figures in flight lag behind). Ray Data's own bars are off unless ``--verbose``
(``pipeline.record_dataset``).
"""

from __future__ import annotations

import sys
import time

from sftprep import report

LINE_SECONDS = 10.0


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stdout is no terminal, yet a bar shows)."""
    shell = sys.modules.get("IPython")
    shell = shell and shell.get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
    """``on_progress`` for ``pipeline.build``; ``close(summary)`` ends it with the final figures.

    ``style``: "bar", "lines" or "off"; default: a bar on a terminal or in a notebook, lines
    otherwise."""

    def __init__(self, style: str | None = None, out=None):
        self.out = out or sys.stdout
        if style is None:
            style = "bar" if in_notebook() or self.out.isatty() else "lines"
        self.style = style
        self.bar = None
        self.last_line = None  # when the last line was printed
        self.latest: dict = {}

    def __call__(self, p: dict) -> None:
        self.latest = p
        if self.style == "bar":
            self._bar(p)
        elif self.style == "lines" and (self.last_line is None
                                        or time.monotonic() - self.last_line > LINE_SECONDS):
            self._line(p)

    def close(self, summary: dict | None = None) -> None:
        """End the display; with the build's ``summary``, show its figures as the last update."""
        if summary is not None and self.style != "off":
            final = {"records": summary["records"], "samples": summary["samples_in"],
                     "documents": summary["documents"], "tokens": summary["tokens"],
                     "seconds": summary.get("elapsed_seconds") or self.latest.get("seconds", 0),
                     "read_tasks": self.latest.get("read_tasks_total"),
                     "read_tasks_total": self.latest.get("read_tasks_total")}
            if self.style == "bar":
                self._bar(final)
            else:
                self._line(final)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, p: dict) -> None:
        print(report.progress_line(p), file=self.out, flush=True)
        self.last_line = time.monotonic()

    def _bar(self, p: dict) -> None:
        if self.bar is None:
            self.bar = _tqdm()(total=p.get("read_tasks_total"), desc="[sftprep] read tasks",
                            unit=" tasks", file=self.out, dynamic_ncols=True, leave=True)
        if p.get("read_tasks") is not None:
            self.bar.n = p["read_tasks"]
        self.bar.set_postfix_str(report.progress_figures(p), refresh=False)
        self.bar.refresh()


def _tqdm():
    """tqdm's notebook widget in Jupyter when ipywidgets is there, else its text bar (what
    ``tqdm.auto`` picks, without its warning when ipywidgets is missing)."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm
            return tqdm
        except ImportError:
            pass
    from tqdm.std import tqdm
    return tqdm
