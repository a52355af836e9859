"""Build Pai-Megatron-Patch SFT training files: ``sftprep build`` as a script, for
``ray job submit -- python jobs/build.py ...`` (options and help: ``sftprep.cli``)."""

import sys

from sftprep import cli

if __name__ == "__main__":
    cli.run(lambda: cli.build(sys.argv[1:], "build.py"))
