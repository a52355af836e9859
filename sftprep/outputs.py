"""The output set a build writes at its prefix ``P``: its file names (``SUFFIXES``, ``REJECTS``;
``idxmap.MANIFEST``), the writers' prefixes (``P_text_document``, or one per shard), the check
that nothing is overwritten unasked, the removal of what earlier builds left (an old output in
``STALE_ORDER``, shards beyond this build's or that no manifest names, uploads left pending),
the clean-up of a failed build (temporary files, the uploads it started), and the finish: seal
every writer, publish their files, then write the one manifest naming them, last (the commit
point of a shard set).

Each writer (``writer.SFTWriter``) names, publishes and aborts its own files; this module decides
everything about the set. No Ray at import: ``verify`` (``view``) uses the names and must not load
it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict

from sftprep.config import BuildConfig, ConfigError
from sftprep.idxmap import MANIFEST
from sftprep.shards import assemble_manifest, shard_prefix, unnamed_shards, write_manifest
from sftprep.sink import abort_upload, pending_uploads
from sftprep.storage import filesystem, is_remote

SUFFIXES = (".bin", ".idx")
REJECTS = ".rejects.jsonl"
# An old output is removed in this order before the new one lands: its index first, so no .idx
# ever describes a .bin it was not written with.
STALE_ORDER = (".idx", MANIFEST, ".bin", REJECTS)

logger = logging.getLogger(__name__)


def local_absolute(prefix: str) -> str:
    """A local output's prefix made absolute: the writer actors' working directory need not be
    the driver's, and Pai's run scripts start in their own example directory, so the trainer's
    --data-path must not be relative either. A URL stays as it is."""
    return prefix if is_remote(prefix) else os.path.abspath(prefix)


def output_prefixes(config: BuildConfig) -> list[str]:
    """The document prefix of each writer: P_text_document, or P_<k>_text_document; absolute
    for a local output (``local_absolute``)."""
    if config.output.shards == 1:
        return [local_absolute(config.document_prefix)]
    return [local_absolute(shard_prefix(config.output.prefix, k))
            for k in range(config.output.shards)]


def check_output_free(config: BuildConfig) -> None:
    fs, path = filesystem(config.document_prefix, config.source.storage_options)
    existing = [path + MANIFEST] if fs.exists(path + MANIFEST) else []
    for prefix in output_prefixes(config):
        fs, path = filesystem(prefix, config.source.storage_options)
        existing += [path + s for s in SUFFIXES if fs.exists(path + s)]
    if existing and not config.output.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it")


def _is_output_file(config: BuildConfig, url: str) -> bool:
    """Whether ``url`` is one of the files a build at ``config.output.prefix`` writes (any
    number of shards)."""
    names = "|".join(re.escape(s) for s in (*SUFFIXES, MANIFEST, REJECTS))
    pattern = re.escape(config.output.prefix) + rf"(_\d+)?_text_document({names})"
    return re.fullmatch(pattern, url) is not None


def abort_uploads(config: BuildConfig, options: dict, started: list[tuple[str, str]]) -> None:
    """Abort the uploads this build started (``started``, in that order), then any other still
    pending on its output files (one a writer started but could not report)."""
    for url, upload in [*started, *(u for u in _pending_output_uploads(config, options)
                                    if u not in started)]:
        with contextlib.suppress(Exception):  # completed, or already aborted by its writer
            abort_upload(url, upload, options)


def _pending_output_uploads(config: BuildConfig, options: dict) -> list[tuple[str, str]]:
    if not is_remote(config.output.prefix):
        return []
    try:
        found = pending_uploads(config.output.prefix, options)
    except Exception:  # a store without a listing of uploads: nothing to find
        return []
    return [(url, upload) for url, upload in found if _is_output_file(config, url)]


def remove_unnamed_shards(config: BuildConfig, options: dict) -> None:
    """Remove the shards at this prefix that no manifest names (``shards.unnamed_shards``):
    a sharded build that stopped before its manifest left them, saying so in one line."""
    fs, path = filesystem(config.document_prefix, options)
    manifest = {}
    if fs.exists(path + MANIFEST):
        with fs.open(path + MANIFEST, "rb") as f:
            manifest = json.load(f)

    def has_files(prefix: str) -> bool:
        fs, path = filesystem(prefix, options)
        return any(fs.exists(path + s) for s in STALE_ORDER)

    unnamed = unnamed_shards(config.output.prefix, manifest, has_files)
    for prefix in unnamed:
        remove_stale(prefix, options)
    if unnamed:
        logger.warning(f"[sftprep] removed {len(unnamed)} shard{'s' * (len(unnamed) != 1)} "
                       f"that no manifest names (a build stopped before it finished): "
                       f"{', '.join(unnamed)}")


def abort_stale_uploads(config: BuildConfig, options: dict) -> None:
    """Abort the uploads an earlier build at this prefix left pending (a driver killed
    outright cannot abort its own), saying so in one line."""
    stale = _pending_output_uploads(config, options)
    for url, upload in stale:
        abort_upload(url, upload, options)
    if stale:
        names = ", ".join(sorted({url for url, _ in stale}))
        logger.warning(f"[sftprep] aborted {len(stale)} pending upload"
                       f"{'s' * (len(stale) != 1)} an earlier build left unfinished: {names}")


def remove_other_shards(config: BuildConfig, options: dict) -> None:
    """Remove the shards an earlier build at this prefix left beyond this build's own
    (``P_k_text_document`` from k = ``shards``; every one for an unsharded build): beside the
    new output they would look like a part of it. A build writes its shards 0..N-1, so the
    first number without files ends the search."""
    k = config.output.shards if config.output.shards > 1 else 0
    while True:
        prefix = shard_prefix(config.output.prefix, k)
        fs, path = filesystem(prefix, options)
        if not any(fs.exists(path + s) for s in STALE_ORDER):
            return
        remove_stale(prefix, options)
        k += 1


def finish(config: BuildConfig, writers: list, extra: dict, options: dict) -> dict:
    """Seal every writer (one, or a shard each), remove the old output's manifest and files
    (unsharded or shards beyond this build's), publish the writers' files, then write the one
    manifest naming them, last."""
    import ray  # only a build gets here (``verify`` imports this module without Ray)

    summaries = ray.get([w.seal.remote(extra["elapsed_seconds"]) for w in writers])
    remove_stale(config.document_prefix, options)
    remove_other_shards(config, options)
    ray.get([w.publish.remote() for w in writers])
    outputs = ray.get([w.outputs.remote() for w in writers])
    figures = ray.get([w.trainer_figures.remote() for w in writers])
    manifest = assemble_manifest(extra, summaries, figures, output_prefixes(config), outputs,
                                 config.template.seq_length, config.document_prefix + MANIFEST,
                                 asdict(config.trainer))
    write_manifest(config.document_prefix + MANIFEST, manifest, options,
                   config.output.spill_dir)
    return manifest


def abandon(config: BuildConfig, options: dict, writers: list, temporary: list[str],
            uploads: list[tuple[str, str]]) -> None:
    """A failed or stopped build's clean-up: what the driver can do itself first (a stop
    (SIGTERM) is followed by SIGKILL within seconds, ray job stop: 3 s, and the writers die with
    the driver), then each writer's own ``abort``."""
    import ray  # as in ``finish``

    remove_temporary(temporary)
    abort_uploads(config, options, uploads)
    with contextlib.suppress(Exception):  # a writer itself may be what died
        ray.get([w.abort.remote() for w in writers], timeout=60)


def remove_temporary(paths: list[str]) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def remove_stale(prefix: str, storage_options: dict | None = None) -> None:
    """Remove an old output at ``prefix`` in ``STALE_ORDER`` (its index first)."""
    if not is_remote(prefix):
        for stale in STALE_ORDER:
            if os.path.exists(prefix + stale):
                os.remove(prefix + stale)
        return
    fs, path = filesystem(prefix, storage_options)
    for stale in STALE_ORDER:
        if fs.exists(path + stale):
            fs.rm_file(path + stale)
