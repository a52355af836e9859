"""sftprep: SFT data (JSON/JSONL, Alpaca and chat formats) to Megatron's SFT idxmap, on Ray Data.

The Python API (``sftprep.api``)::

    import sftprep
    sftprep.stats(input="data/train.jsonl", tokenizer="/models/qwen", seq_length=4096)
    result = sftprep.build(input="data/train.jsonl", tokenizer="/models/qwen",
                           seq_length=4096, packing="bfd", output_prefix="out/qwen_sft")
    sftprep.inspect("out/qwen_sft", doc=0)
    sftprep.verify("out/qwen_sft")

User errors raise ``sftprep.Error``. Importing the package is light: Ray and transformers load
when a call needs them.

The package reads like the data flow: ``sources`` (read raw records) → ``records`` (parse
formats) → ``template`` (chat template, loss spans) → ``tokenize`` (the worker stage) →
``packing`` → ``writer`` (the ordered writer actors) → ``idxmap`` (the file format);
``pipeline`` wires them into a Ray Data job; ``api`` and ``cli`` are the interfaces.
"""

from sftprep.errors import Error, Invalid

__version__ = "0.1.0"
__all__ = ["build", "stats", "inspect", "verify", "Error", "Invalid", "BuildConfig",
           "BuildResult", "StatsResult", "Document"]

_API = ("build", "stats", "inspect", "verify", "BuildResult", "StatsResult", "Document")


def __getattr__(name: str):
    """The API on first use, so ``import sftprep`` imports neither Ray nor transformers."""
    if name in _API:
        from sftprep import api
        return getattr(api, name)
    if name == "BuildConfig":
        from sftprep.config import BuildConfig
        return BuildConfig
    raise AttributeError(f"module 'sftprep' has no attribute {name!r}")
