"""The config tree: defaults < YAML < command line, validation messages, secrets redacted."""

from __future__ import annotations

import pytest

from sftprep.config import BuildConfig, ConfigError, flags, load, validate
from sftprep.storage import redact


def test_precedence_and_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("template: {seq_length: 512, pad_token: '<|extra_0|>'}\n"
                    "packing: {mode: bfd}\nsource: {inputs: a.jsonl}\n")
    config = load(BuildConfig, str(path), {"template.seq_length": 1024})
    assert config.template.seq_length == 1024 and config.template.pad_token == "<|extra_0|>"
    assert config.packing.mode == "bfd" and config.source.inputs == ["a.jsonl"]
    assert config.document_prefix == "<required>_text_document"


def test_unknown_keys_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("templat: {seq_length: 512}\n")
    with pytest.raises(ConfigError, match="unknown section 'templat'"):
        load(BuildConfig, str(path))
    with pytest.raises(ConfigError, match="unknown option 'template.seq'"):
        load(BuildConfig, None, {"template.seq": 3})


@pytest.mark.parametrize("override,message", [
    ({"source.inputs": []}, "no input"),
    ({"template.tokenizer": "/nonexistent"}, "is not a directory"),
    ({"template.seq_length": 1}, "--seq-length"),
    ({"packing.mode": "magic"}, "--packing 'magic'"),
    ({"source.on_error": "ignore"}, "--on-error"),
    ({"output.prefix": ""}, "no output"),
])
def test_validation_names_the_flag(qwen_dir, override, message):
    base = {"source.inputs": ["x.jsonl"], "template.tokenizer": qwen_dir, "output.prefix": "o"}
    with pytest.raises(ConfigError, match=message):
        validate(load(BuildConfig, None, {**base, **override}))


def test_every_flag_is_unique_and_documented():
    names = [f for f, _, _ in flags(BuildConfig)]
    assert len(names) == len(set(names)) and "--seq-length" in names
    assert all(field.metadata["help"] for _, _, field in flags(BuildConfig))


def test_redact_hides_secrets_only():
    opts = {"endpoint": "http://oss", "key": "AKID", "secret": "s3cr3t",
            "client_kwargs": {"aws_secret_access_key": "x", "region": "r"}}
    tree = redact({"source": {"storage_options": opts, "inputs": ["oss://b/key.jsonl"]}})
    assert tree["source"]["inputs"] == ["oss://b/key.jsonl"]
    assert "AKID" not in str(tree) and "s3cr3t" not in str(tree)
    assert tree["source"]["storage_options"]["endpoint"] == "http://oss"
