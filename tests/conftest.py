"""Shared fixtures: one Ray runtime for the whole session, the real Qwen tokenizer, small data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite's own cache (store copies, prepared tokenizers), shared by its subprocesses: never
# the user's.
os.environ["SFTPREP_CACHE"] = tempfile.mkdtemp(prefix="sftprep-test-cache-")
atexit.register(shutil.rmtree, os.environ["SFTPREP_CACHE"], True)


@pytest.fixture(scope="session")
def qwen_dir() -> str:
    from sftprep.demo import qwen_tokenizer_dir
    return qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    """The Qwen tokenizer as the reference sets it up (pad <|extra_0|>, its own template)."""
    from sftprep.template import load_tokenizer
    return load_tokenizer(qwen_dir, "<|extra_0|>")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray runtime shared by every test that needs one (2 CPUs, like CI)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error",
                                       "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()
