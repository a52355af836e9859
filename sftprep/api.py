"""The Python API, the product's core: ``build``, ``stats``, ``inspect``, ``verify``.

Keywords mirror the command line's options (the flag without ``--``, ``-`` as ``_``:
``seq_length=4096`` for ``--seq-length 4096``); ``config=`` takes a YAML preset or a
``BuildConfig``, and keywords override it. Every user error raises ``sftprep.Error`` with the
line the command line prints, naming the keyword given. The command line (``sftprep.cli``) and
``jobs/*.py`` are thin layers over the functions here.

A call leaves the process as it found it, as a notebook kernel needs: Ray Data's context and
Ray's loggers are restored and a Ray runtime the call started is stopped (``kept_process``).
Nothing heavy is imported before a call needs it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

from sftprep import config as config_module
from sftprep.config import BuildConfig, ConfigError, naming
from sftprep.errors import Error, Invalid, did_you_mean, user_error

# -- configuration from keywords -----------------------------------------------------------------

def configure(cls: type, config: Any = None, options: dict | None = None,
              defaults: dict | None = None) -> Any:
    """A ``cls`` config from ``config`` (a YAML path, a config object or None), ``defaults``
    (dotted keys) and ``options`` (API keywords), in that order of precedence (last wins)."""
    known = config_module.options(cls)
    overrides = dict(defaults or {})
    for key, value in (options or {}).items():
        if key not in known:
            raise ConfigError(f"{key}={value!r}: unknown option" + did_you_mean(key, known))
        overrides[known[key][0]] = value
    if isinstance(config, cls):
        config = copy.deepcopy(config)
        for path, value in overrides.items():
            config_module._set(config, path, value, "keywords")
            config.from_file = {k: v for k, v in getattr(config, "from_file", {}).items()
                                if k != path}
        return config
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"config={config!r}: give a YAML file's path or a {cls.__name__}")
    return config_module.load(cls, config, overrides)


@contextlib.contextmanager
def user_errors():
    """Raise a user error as itself (unwrapped from Ray's task error), with no chain."""
    try:
        yield
    except Error:
        raise
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise found from None


@contextlib.contextmanager
def kept_process(verbose: bool = False):
    """Run a Ray job quietly (``sftprep.quiet``) and leave the process as it was: Ray Data's
    current ``DataContext`` (the job changes a copy), Ray's loggers, and no Ray runtime left
    running that this call started (one it joined is left alone; a lost one is not shut down,
    which would wait on it)."""
    from sftprep.quiet import quiet

    with quiet(verbose):
        import ray

        from sftprep import ray_compat
        from sftprep.runtime import RuntimeLost

        started = not ray.is_initialized()
        lost = False
        try:
            with ray_compat.data_context_copy():
                yield
        except RuntimeLost:
            lost = True
            raise
        finally:
            if started and not lost and ray.is_initialized():
                ray.shutdown()


# -- build ---------------------------------------------------------------------------------------

@dataclass(repr=False)
class BuildResult:
    """What a build wrote: ``manifest`` (as saved beside the files) and views of it."""

    manifest: dict

    @property
    def summary(self) -> dict:
        """The figures: records, samples, documents, tokens, pad fraction, cuts, time."""
        return self.manifest["summary"]

    @property
    def data_path(self) -> str:
        """What the trainer's ``--data-path`` takes (the prefix, or the shards' list)."""
        return self.manifest["data_path"]

    @property
    def files(self) -> dict:
        """The output files: ``{"bin", "idx", "manifest", "rejects"?}``, per shard if sharded."""
        if "shards" in self.manifest:
            return {**self.manifest["files"],
                    "shards": [s["files"] for s in self.manifest["shards"]]}
        return self.manifest["files"]

    @property
    def trainer(self) -> dict:
        """The settings to train with: Pai's run-script variables and Megatron's flags."""
        return self.manifest["trainer"]["train_with"]

    def __str__(self) -> str:
        from sftprep import report
        return report.summary_text(self.manifest)

    def __repr__(self) -> str:
        s = self.summary
        return (f"<BuildResult {self.data_path}: {s['documents']:,} documents, "
                f"{s['samples_written']:,} samples, {s['tokens']:,} tokens>")

    def _repr_pretty_(self, p, cycle) -> None:  # IPython and Jupyter show the summary
        p.text(str(self))


def build(config: str | BuildConfig | None = None, **options: Any) -> BuildResult:
    """Build the SFT idxmap files; keywords as ``sftprep build``'s options.

    ``sftprep.build(input=["a.jsonl", "b.jsonl"], tokenizer="/models/qwen", seq_length=4096,
    packing="bfd", output_prefix="out/qwen_sft")``. Without ``input`` and ``config`` it builds
    the built-in demo, as the command does. A bar shows the progress (``progress=False``: none).
    """
    with user_errors():
        cfg = configure(BuildConfig, config, options, _demo_defaults(config, options))
        with naming("python", cfg):
            return BuildResult(run_build(cfg))


def _demo_defaults(config: Any, options: dict) -> dict | None:
    if config is None and "input" not in options:
        from sftprep.demo import demo_overrides
        return demo_overrides()
    return None


def run_build(cfg: BuildConfig, out=None) -> dict:
    """Run a configured build with sftprep's progress on ``out``; return the manifest."""
    from sftprep.progress import Progress

    progress = Progress(None if cfg.run.progress else "off", out)
    manifest = None
    try:
        with kept_process(cfg.run.verbose):
            from sftprep import pipeline
            manifest = pipeline.build(cfg, on_progress=progress)
    finally:
        progress.close(manifest and manifest["summary"])
    return manifest


# -- stats ---------------------------------------------------------------------------------------

@dataclass(repr=False)
class StatsResult:
    """Length statistics: ``stats`` (as ``stats.json`` holds them), ``table`` (lengths per
    part: characters, and tokens with a tokenizer), ``ladder`` (what each S would make) and
    ``figure`` (the token-length histogram; None without a tokenizer or matplotlib)."""

    stats: dict
    figure: Any = None
    table: Any = field(default=None)
    ladder: Any = field(default=None)

    def __str__(self) -> str:
        from sftprep import lengths
        return lengths.summary_text(self.stats)

    def __repr__(self) -> str:
        return (f"<StatsResult {self.stats['records']:,} records, "
                f"{self.stats['samples']:,} samples>")

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


def stats(config: str | Any = None, **options: Any) -> StatsResult:
    """Length statistics of SFT data, and what a build at ``seq_length`` would make of it;
    keywords as ``sftprep stats``'s options (``input=``, ``tokenizer=``, ``seq_length=``, ...)."""
    from sftprep.quiet import imports

    with imports():  # the module imports Ray
        from sftprep import lengths
    with user_errors():
        cfg = configure(lengths.StatsConfig, config, options)
        with naming("python", cfg), kept_process(cfg.run.verbose):
            result, measured = lengths.measure(cfg)
    figure = (lengths.histogram_figure(measured.tokens, result)
              if "tokens" in result and lengths._have_matplotlib() else None)
    return StatsResult(result, figure, *lengths.tables(result))


# -- reading built files -------------------------------------------------------------------------

@dataclass(repr=False)
class Document:
    """One document of built files, decoded: ``text`` marks trained text ⟦like this⟧; in a
    notebook the trained text is highlighted."""

    index: int
    text: str
    html: str

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.html


def inspect(prefix: str, doc: int = 0, tokenizer: str | None = None,
            color: bool = False) -> Document:
    """Document ``doc`` of the files at ``prefix`` (the build's output prefix, the files'
    prefix or one file's name), decoded with the manifest's tokenizer (or ``tokenizer``);
    ``color``: trained text in green in ``text`` (for a terminal), else marked ⟦…⟧."""
    with naming("python"):
        return document(prefix, doc, tokenizer, color)


def verify(prefix: str, tokenizer: str | None = None, trainer_mode: str = "any") -> dict:
    """Check every invariant of the SFT layout; return the figures (documents, samples,
    tokens, pad, S, and ``trainer``: what each trainer mode meets). Raises
    ``sftprep.Invalid`` (an ``Error``) at the first violation, or when the files are not
    safe for ``trainer_mode`` (packed, unpacked or any)."""
    with naming("python"):
        return check(prefix, tokenizer, trainer_mode)


def document(prefix: str, doc: int, tokenizer: str | None, color: bool) -> Document:
    """``inspect`` for either interface (messages in the caller's ``naming``)."""
    from sftprep import idxmap, view

    with user_errors():
        prefix = view.find_prefix(prefix)
        tok = _tokenizer(prefix, tokenizer, need=True)
        reader = idxmap.IndexedReader(prefix)
        if not 0 <= doc < len(reader):
            raise ConfigError(f"{config_module.named('doc', doc)}: the file has "
                              f"{len(reader)} documents")
        return Document(doc, view.describe_document(reader, doc, tok, color),
                        view.document_html(reader, doc, tok))


def check(prefix: str, tokenizer: str | None, trainer_mode: str) -> dict:
    """``verify`` for either interface."""
    from sftprep import idxmap, trainer, view

    with user_errors():
        prefix = view.find_prefix(prefix)
        tok = _tokenizer(prefix, tokenizer)
        try:
            figures = view.verify(prefix, tok)
            trainer.require(figures["trainer"], trainer_mode)
        except (idxmap.LayoutError, FileNotFoundError) as e:
            raise Invalid(str(e)) from None
        return {**figures, "prefix": prefix}


def _tokenizer(prefix: str, given: str | None, need: bool = False):
    """The tokenizer ``given``, else the one the manifest names (None if none and not needed)."""
    from sftprep import tokenizer_files, view
    from sftprep.template import load_tokenizer

    manifest_tok = view.manifest_of(prefix).get("tokenizer", {})
    path = given or tokenizer_files.pinned(manifest_tok)
    if not path:
        if need:
            raise ConfigError(f"{prefix}: no manifest names a tokenizer; give "
                              f"{config_module.option('template.tokenizer', 'DIR')}")
        return None
    return load_tokenizer(tokenizer_files.resolve(path).path, manifest_tok.get("pad_token"))


__all__ = ["build", "stats", "inspect", "verify", "BuildResult", "StatsResult", "Document",
           "Error", "Invalid"]
