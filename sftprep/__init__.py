"""sftprep: SFT data (JSON/JSONL, Alpaca and chat formats) to Megatron's SFT idxmap, on Ray Data.

The package reads like the data flow: ``sources`` (read raw records) → ``records`` (parse
formats) → ``template`` (chat template, loss spans) → ``tokenize`` (the worker stage) →
``packing`` → ``writer`` (the single ordered writer actor) → ``idxmap`` (the file format);
``pipeline`` wires them into a Ray Data job.
"""

__version__ = "0.1.0"
