"""``python -m sftprep build|stats|inspect|verify``: the ``sftprep`` command (``sftprep.cli``)."""

from __future__ import annotations

import sys

from sftprep.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sftprep"))
