"""The typed configuration tree of the jobs, filled from YAML presets and the command line.

Every field carries its help text and its command-line flag as metadata, so the jobs build their
argument parsers from this file and a YAML preset uses the same names nested by section::

    source: {inputs: [data/*.jsonl], on_error: skip}
    template: {tokenizer: /models/qwen, seq_length: 4096, pad_token: "<|extra_0|>"}
    packing: {mode: bfd}
    output: {prefix: out/qwen_sft}

Precedence: field defaults < ``--config`` YAML < flags given on the command line.
Validation lives in ``validate`` only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from sftprep.errors import Error, did_you_mean
from sftprep.packing import MODES

REQUIRED = "<required>"
TOKENIZER_HELP = ("Hugging Face tokenizer: a local directory, an oss:// or s3:// directory, or a "
                  "hub id (Qwen/Qwen3-8B, optionally @revision; HF_ENDPOINT for a mirror, "
                  "HF_HUB_OFFLINE=1 for the local cache only, USE_MODELSCOPE_HUB=1 for "
                  "ModelScope); only its tokenizer files are fetched, once, by the driver")


def opt(default: Any, help: str, flag: str | None = None, short: str | None = None,
        **kw: Any) -> Any:
    meta = {"help": help, "flag": flag, "short": short}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class SourceConfig:
    inputs: list = opt([], "input sources, each a file, directory or glob: local paths or "
                       "fsspec URLs (oss://, s3://); .jsonl (one sample a line) or .json (an "
                       "array), optionally .gz, or .parquet; PATH#N takes exactly N records "
                       "(more than the source holds: whole copies and a sample of the rest); "
                       "YAML also takes {path: P, samples: N | fraction: F | repeat: K}",
                       "--input")
    seed: int = opt(42, "seed of the samples that #N, samples and fraction take (the same seed "
                    "takes the same records on every run)", "--seed")
    format: str = opt("auto", "record format: auto (detected per line), alpaca, messages, "
                      "sharegpt", "--format")
    columns: dict = opt({}, "rename fields before format detection, e.g. "
                        "{prompt: instruction, answer: output} (YAML only)")
    storage_options: dict = opt({}, "fsspec options for object storage (endpoint, key, ...); "
                                "default: the usual OSS_*/AWS_* environment variables (YAML only)")
    on_error: str = opt("fail", "bad records: fail (stop at the first, naming file and line) "
                        "or skip (write the rest, list them in <prefix>.rejects.jsonl)",
                        "--on-error")
    split_bytes: int | None = opt(None, "read an uncompressed .jsonl, .json array or .parquet "
                                  "file larger than this in several tasks of about this many "
                                  "bytes; 0: one task per file (default: about 4 tasks per "
                                  "cluster CPU over all the input, none under 32 MiB)",
                                  "--split-bytes")


@dataclass
class TemplateConfig:
    tokenizer: str = opt(REQUIRED, TOKENIZER_HELP, "--tokenizer")
    seq_length: int = opt(2048, "training sequence length S; each document holds 2*S values",
                          "--seq-length")
    pad_token: str | None = opt(None, "pad token (default: the tokenizer's pad, else its eos); "
                                "added as a special token if not in the vocabulary, as the "
                                "reference does with <|extra_0|>", "--pad-token")
    chat_template: str | None = opt(None, "Jinja chat template file overriding the tokenizer's "
                                    "(default: the tokenizer's, else the reference's ChatML)",
                                    "--chat-template")
    train_on: str = opt("all", "which assistant turns are trained: all or last", "--train-on")
    train_tool_calls: bool = opt(True, "train on assistant turns that call tools",
                                 "--train-tool-calls")
    backend: str = opt("auto", "tokenizer backend: auto (an exact fast path for byte-level BPE "
                       "tokenizers where it applies, checked against Hugging Face on a sample "
                       "of every build; else Hugging Face) or hf (always Hugging Face)",
                       "--tokenizer-backend")
    trainer_safe: bool = opt(True, "cut samples so Pai-Megatron-Patch's trainer reads every "
                             "document in both modes with every boundary intact: at most S-1 "
                             "tokens, never ending on id 0 (docs/trainer.md); off reproduces the "
                             "reference tool, including rows packed training cannot read",
                             "--trainer-safe")
    overlong: str = opt("truncate", "a sample longer than a document holds (S, or S-1 with "
                        "--trainer-safe): truncate (cut it, the reference's rule) or drop (leave "
                        "it out, counted and listed in <prefix>.rejects.jsonl)", "--overlong")
    reasoning_turns: str = opt("keep", "reasoning the chat template leaves out (Qwen3 renders "
                               "it only after the last user message): keep (render as the "
                               "template does; counted) or split (each trained turn whose "
                               "reasoning is left out becomes its own sample, its earlier turns "
                               "as context)", "--reasoning-turns")


@dataclass
class PackingConfig:
    mode: str = opt("none", "none (one document per line), sequential (the reference's "
                    "--sequence-packing) or bfd (best-fit-decreasing, least padding)",
                    "--packing")
    window: int = opt(2000, "bfd: samples considered together; memory grows with it",
                      "--pack-window")


@dataclass
class OutputConfig:
    prefix: str = opt(REQUIRED, "output prefix P: writes P_text_document.{bin,idx} and "
                      "P_text_document.manifest.json; local path or fsspec URL", "--output-prefix")
    overwrite: bool = opt(False, "replace an existing output instead of refusing", "--overwrite")
    spill_dir: str | None = opt(None, "local directory for a remote output's parts in flight "
                                "and its index (default: the system temp directory)",
                                "--spill-dir")
    shards: int = opt(1, "ordered writers, each writing P_<k>_text_document.{bin,idx} from a "
                      "contiguous range of the input; the manifest gives the --data-path for all",
                      "--shards")


@dataclass
class RunConfig:
    workers: int | None = opt(None, "tokenizer actors (default: the cluster's CPUs)", "--workers")
    batch_size: int = opt(256, "records per tokenizer batch", "--batch-size")
    block_records: int = opt(2048, "records per block read from a file", "--block-records")
    progress: bool = opt(True, "show the build's progress: one bar on a terminal or in a "
                         "notebook, a line every 10 s when piped (Ray Data's own bars: only "
                         "with --verbose)", "--progress")
    verbose: bool = opt(False, "show the logs of Ray and transformers (hidden by default; Ray "
                        "keeps them in its session's log directory either way)", "--verbose",
                        short="-v")


@dataclass
class TrainerConfig:
    epochs: int = opt(1, "epochs to train: the TRAIN_ITERS the summary and the manifest give "
                      "for Pai's run script are ceil(documents * epochs / global batch size)",
                      "--epochs")
    global_batch_size: int = opt(8, "the GLOBAL_BATCH_SIZE you train with (Pai's example "
                                 "scripts use 8), for TRAIN_ITERS", "--global-batch-size")


@dataclass
class BuildConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @property
    def document_prefix(self) -> str:
        return self.output.prefix + "_text_document"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(Error, ValueError):
    """A configuration value is missing or invalid; the message says which and how to fix it."""


def flags(config_cls: type = BuildConfig) -> list[tuple[str, str, dataclasses.Field]]:
    """``(flag, dotted path, field)`` for every field settable from the command line."""
    out = []
    for section in dataclasses.fields(config_cls):
        for f in dataclasses.fields(section.default_factory):
            if f.metadata.get("flag"):
                out.append((f.metadata["flag"], f"{section.name}.{f.name}", f))
    return out


def load(cls: type = BuildConfig, yaml_path: str | None = None,
         overrides: dict[str, Any] | None = None) -> Any:
    """Defaults, then the YAML file, then ``overrides`` (``{"template.seq_length": 4096}``).

    The config remembers which values its YAML file set (``config.from_file``), so that a
    message about one names the file and key the user wrote."""
    config = cls()
    config.from_file = {}
    if yaml_path:
        with open(yaml_path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for section, values in data.items():
            if not hasattr(config, section) or not isinstance(values, dict):
                names = [f.name for f in dataclasses.fields(cls)]
                raise ConfigError(f"{yaml_path}: unknown section {section!r}; sections are "
                                  f"{', '.join(names)}" + did_you_mean(str(section), names))
            for key, value in values.items():
                _set(config, f"{section}.{key}", value, yaml_path)
                config.from_file[f"{section}.{key}"] = yaml_path
    for path, value in (overrides or {}).items():
        _set(config, path, value, "command line")
        config.from_file.pop(path, None)
    return config


def _set(config: Any, path: str, value: Any, origin: str) -> None:
    section, _, key = path.partition(".")
    target = getattr(config, section, None) if key else None
    if target is None or key not in {f.name for f in dataclasses.fields(target)}:
        paths = [p for p, _ in options(type(config)).values()]
        raise ConfigError(f"{origin}: unknown option {path!r}" + did_you_mean(path, paths))
    if key == "inputs" and isinstance(value, str):
        value = [value]
    setattr(target, key, value)


def _check_source(where: str, entry: Any) -> None:
    """An input entry: a path string, or ``{path, samples | fraction | repeat}``."""
    if isinstance(entry, str) and entry:
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ConfigError(f"{where} {entry!r}: give a path, or a mapping with a path and at most "
                          "one of samples, fraction, repeat")
    unknown = set(entry) - {"path", "samples", "fraction", "repeat"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; an input takes path and "
                          "at most one of samples, fraction, repeat")
    chosen = [k for k in ("samples", "fraction", "repeat") if entry.get(k) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{where}: {' and '.join(chosen)} given; choose one")
    for k in chosen:
        v = entry[k]
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
              if k == "fraction" else isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        if not ok:
            raise ConfigError(f"{where}: {k}: {v!r}: must be "
                              + ("a number > 0" if k == "fraction" else "an integer >= 1"))


# -- naming options as the user wrote them ------------------------------------------------------

def options(config_cls: type = BuildConfig) -> dict[str, tuple[str, dataclasses.Field]]:
    """``{keyword: (dotted path, field)}`` for every field: the Python API's keyword is the
    flag without ``--`` (``seq_length`` for ``--seq-length``), else the field's name."""
    out = {}
    for section in dataclasses.fields(config_cls):
        for f in dataclasses.fields(section.default_factory):
            flag = f.metadata.get("flag")
            out[flag[2:].replace("-", "_") if flag else f.name] = (f"{section.name}.{f.name}", f)
    return out


# How the current call's user names options: "cli" (--seq-length 4096) or "python"
# (seq_length=4096), and the values a YAML file set ({"template.seq_length": "c.yaml"}).
_naming: contextvars.ContextVar = contextvars.ContextVar("naming", default=("cli", {}, None))


@contextlib.contextmanager
def naming(style: str, config: Any = None):
    """Messages raised inside name options in ``style`` ("cli" or "python"), and the values
    ``config``'s YAML file set by that file and key."""
    token = _naming.set((style, getattr(config, "from_file", {}),
                         None if config is None else type(config)))
    try:
        yield
    finally:
        _naming.reset(token)


def option(path: str, metavar: str = "") -> str:
    """How the user sets ``path`` (``--tokenizer DIR``, ``tokenizer=DIR``)."""
    style, _, cls = _naming.get()
    field_ = _field(cls or BuildConfig, path)
    flag = field_.metadata.get("flag") if field_ else None
    if style == "python":
        return f"{flag[2:].replace('-', '_') if flag else path.split('.')[1]}={metavar}"
    if not flag:  # YAML only
        return f"{path}: {metavar}" if metavar else path
    return f"{flag} {metavar}".rstrip()


def given(path: str, value: Any, show: str | None = None) -> str:
    """The option and the value the user gave: ``--seq-length 1`` on the command line,
    ``seq_length=1`` in Python, ``c.yaml: template.seq_length: 1`` from a file. ``show``: the
    value as the command line prints it (default: its repr)."""
    style, files, _ = _naming.get()
    if path in files:
        return f"{files[path]}: {path}: {value!r}"
    if style == "python":
        return option(path, repr(value))
    return option(path, repr(value) if show is None else show)


def named(keyword: str, value: Any) -> str:
    """An option that is no config field (``inspect``'s ``doc``) as the user gave it."""
    if _naming.get()[0] == "python":
        return f"{keyword}={value!r}"
    return f"--{keyword.replace('_', '-')} {value}"


def _field(cls: type, path: str) -> dataclasses.Field | None:
    section, _, key = path.partition(".")
    for s in dataclasses.fields(cls):
        if s.name == section:
            return next((f for f in dataclasses.fields(s.default_factory) if f.name == key), None)
    return None


def validate(config: BuildConfig, need_tokenizer: bool = True, need_output: bool = True) -> None:
    """Raise ``ConfigError`` naming the first invalid value and the fix."""
    src, tpl = config.source, config.template
    if not src.inputs:
        raise ConfigError(f"no input: give {option('source.inputs', 'PATH')} (repeatable) or "
                          "source.inputs in a YAML config")
    for k, entry in enumerate(src.inputs):
        _check_source(f"source.inputs[{k}]", entry)
    if not isinstance(src.seed, int) or isinstance(src.seed, bool):
        raise ConfigError(f"{given('source.seed', src.seed)}: must be an integer")
    if src.format not in ("auto", "alpaca", "messages", "sharegpt"):
        raise ConfigError(f"{given('source.format', src.format)}: choose auto, alpaca, "
                          "messages or sharegpt")
    if src.on_error not in ("fail", "skip"):
        raise ConfigError(f"{given('source.on_error', src.on_error)}: choose fail or skip")
    if src.split_bytes is not None and (not isinstance(src.split_bytes, int)
                                        or src.split_bytes < 0):
        raise ConfigError(f"{given('source.split_bytes', src.split_bytes)}: must be an "
                          "integer >= 0 (0: one read task per file)")
    if need_tokenizer and tpl.tokenizer in (REQUIRED, None, ""):
        raise ConfigError(f"no tokenizer: give {option('template.tokenizer', 'DIR')} (a "
                          "directory), an oss:// or s3:// directory, or a hub id such as "
                          "Qwen/Qwen3-8B")
    if tpl.tokenizer not in (REQUIRED, None, ""):
        from sftprep import tokenizer_files  # it needs ConfigError from here
        tokenizer_files.check(tpl.tokenizer)
    if not isinstance(tpl.seq_length, int) or tpl.seq_length < 2:
        raise ConfigError(f"{given('template.seq_length', tpl.seq_length)}: must be an "
                          "integer >= 2")
    if tpl.train_on not in ("all", "last"):
        raise ConfigError(f"{given('template.train_on', tpl.train_on)}: choose all or last")
    if tpl.overlong not in ("truncate", "drop"):
        raise ConfigError(f"{given('template.overlong', tpl.overlong)}: choose truncate or drop")
    if tpl.reasoning_turns not in ("keep", "split"):
        raise ConfigError(f"{given('template.reasoning_turns', tpl.reasoning_turns)}: choose "
                          "keep or split")
    if tpl.backend not in ("auto", "hf"):
        raise ConfigError(f"{given('template.backend', tpl.backend)}: choose auto or hf")
    if tpl.chat_template and not os.path.isfile(tpl.chat_template):
        raise ConfigError(f"{given('template.chat_template', tpl.chat_template)} is not a file")
    if config.packing.mode not in MODES:
        raise ConfigError(f"{given('packing.mode', config.packing.mode)}: choose one of "
                          f"{', '.join(MODES)}")
    if config.packing.window < 1:
        raise ConfigError(f"{given('packing.window', config.packing.window)}: must be >= 1")
    if need_output and config.output.prefix in (REQUIRED, None, ""):
        raise ConfigError(f"no output: give {option('output.prefix', 'P')} (writes "
                          "P_text_document.bin/.idx)")
    if need_output and (not isinstance(config.output.shards, int) or config.output.shards < 1):
        raise ConfigError(f"{given('output.shards', config.output.shards)}: must be an "
                          "integer >= 1")
    trainer = getattr(config, "trainer", None)  # the stats job's config has none
    if trainer is not None:
        for path, value in (("trainer.epochs", trainer.epochs),
                            ("trainer.global_batch_size", trainer.global_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{given(path, value)}: must be an integer >= 1")
    run = config.run
    if run.workers is not None and run.workers < 1:
        raise ConfigError(f"{given('run.workers', run.workers)}: must be >= 1")
    for path, value in (("run.batch_size", run.batch_size),
                        ("run.block_records", run.block_records)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{given(path, value)}: must be an integer >= 1")
