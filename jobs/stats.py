"""Length statistics of SFT data: ``sftprep stats`` as a script, for
``ray job submit -- python jobs/stats.py ...`` (options and help: ``sftprep.cli``)."""

import sys

from sftprep import cli

if __name__ == "__main__":
    cli.run(lambda: cli.stats(sys.argv[1:], "stats.py"))
