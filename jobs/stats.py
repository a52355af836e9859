"""Length statistics of SFT data, and what a build at --seq-length would make of it.

Characters per sample as the reference's sample_stats.py prints them; with --tokenizer also the
token lengths under the chat template, drops, cuts, and the projected packing of every mode.

    python jobs/stats.py --input data/train.json
    python jobs/stats.py --input data/ --tokenizer /models/qwen --seq-length 4096 \
        --output-dir out/stats
    ray job submit --working-dir . -- python jobs/stats.py --config conf/stats.yaml ...
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # noqa: E402

from sftprep.stats import StatsConfig  # noqa: E402


def main(argv: list[str]) -> None:
    from sftprep import stats

    config = cli.parse(StatsConfig, __doc__.split("\n")[0], argv)
    print(stats.summary_text(stats.run(config)))


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
