"""Build Pai-Megatron-Patch SFT training files from JSON/JSONL SFT data.

    python jobs/build.py                      # the built-in demo, into ./output/
    python jobs/build.py --input data/*.jsonl --tokenizer /models/qwen --seq-length 4096 \
        --output-prefix out/qwen_sft --packing bfd
    ray job submit --working-dir . -- python jobs/build.py --config conf/qwen2-reference.yaml ...
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # noqa: E402

from sftprep.config import BuildConfig  # noqa: E402


def main(argv: list[str]) -> None:
    from sftprep import pipeline, report
    from sftprep.demo import demo_overrides

    defaults = demo_overrides() if not argv else None
    config = cli.parse(BuildConfig, __doc__.split("\n")[0], argv, defaults)
    if defaults:
        print(f"[sftprep] no arguments: building the demo into {config.output.prefix}_text_document")
    manifest = pipeline.build(config, on_progress=lambda p: print(report.progress_line(p),
                                                                  flush=True))
    print(report.summary_text(manifest))
    print(json.dumps({"summary": manifest["summary"]}, separators=(",", ":")))


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
