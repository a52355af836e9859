"""Shared fixtures: one Ray runtime for the whole session, the real Qwen tokenizer, small data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def qwen_dir() -> str:
    from sftprep.demo import qwen_tokenizer_dir
    return qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    """The Qwen tokenizer as the reference sets it up (pad <|extra_0|>, its own template)."""
    from sftprep.template import load_tokenizer
    return load_tokenizer(qwen_dir, "<|extra_0|>")


@pytest.fixture(scope="session", autouse=True)
def tokenizers_loaded_once():
    """Each in-process build or stats run loads its tokenizer and prepares the fast path's
    tables (~1.5 s, in every one of some sixty builds); the session does it once per tokenizer,
    keyed by its files' hashes and the settings that shape it. Resolving the tokenizer (store
    copies, hub ids) and its errors still run every time; subprocess builds load their own."""
    from sftprep import pipeline
    from sftprep.tokenizer_files import file_hashes
    loaded, prepared = {}, {}

    def load_tokenizer(path, pad_token=None, chat_template=None):
        template = open(chat_template, encoding="utf-8").read() if chat_template else None
        key = (path, tuple(file_hashes(path).items()), pad_token, template)
        if key not in loaded:
            loaded[key] = real_load(path, pad_token, chat_template)
        return loaded[key]

    def prepare(tok, backend="auto"):
        key = (id(tok), backend)
        if key not in prepared or prepared[key][0] is not tok:
            prepared[key] = tok, real_prepare(tok, backend)
        return prepared[key][1]

    real_load, real_prepare = pipeline.load_tokenizer, pipeline.prepare
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "load_tokenizer", load_tokenizer)
        m.setattr(pipeline, "prepare", prepare)
        yield


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray runtime shared by every test that needs one (2 CPUs, like CI)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error",
                                       "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()
