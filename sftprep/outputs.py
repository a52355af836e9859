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
import tempfile
import uuid
from dataclasses import asdict

from sftprep.config import BuildConfig, ConfigError
from sftprep.idxmap import MANIFEST
from sftprep.shards import assemble_manifest, shard_prefix, unnamed_shards, write_manifest
from sftprep.sink import MultipartSink, abort_upload, pending_uploads, upload_file
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
            try:
                manifest = json.load(f)
            except ValueError:  # not a manifest a build wrote (they are written whole): it
                pass            # names no shard

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


class OutputFiles:
    """The files one writer owns at its document prefix, from their temporary names to their
    final ones. A local output goes to ``<prefix>.tmp-<run>.bin/.idx`` beside it. A remote
    ``.bin`` streams to the store as a multipart upload while documents arrive
    (``sink.MultipartSink``: local disk holds a few parts, never the file); the ``.idx``, rejects
    and manifest wait in a local spill directory. ``publish`` removes the old output (its
    ``.idx`` first), then gives the ``.bin`` its name (or completes its upload, which is when the
    object appears), then the ``.idx``, the manifest last, so at no moment does a ``.idx`` sit
    beside a ``.bin`` it does not describe. ``abort`` deletes the temporary files and aborts the
    upload."""

    def __init__(self, prefix: str, storage_options: dict | None = None,
                 spill_dir: str | None = None):
        self.prefix, self.storage_options = prefix, storage_options
        self.remote = is_remote(prefix)
        run = uuid.uuid4().hex[:8]
        if self.remote:
            self._spill = tempfile.mkdtemp(prefix="sftprep-", dir=spill_dir)
            local = os.path.join(self._spill, os.path.basename(prefix))
        else:
            self._spill = None
            local = prefix
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.tmp = f"{local}.tmp-{run}"  # + a suffix: a file's temporary name
        self.bin = (MultipartSink(prefix + ".bin", storage_options, self._spill)
                    if self.remote else open(self.tmp + ".bin", "wb"))

    def upload(self) -> tuple[str, str] | None:
        """The ``.bin``'s multipart upload (url, upload id), once started."""
        if self.remote and self.bin.upload_id:
            return self.bin.url, self.bin.upload_id
        return None

    def seal_bin(self) -> int:
        """The ``.bin``'s size, the file closed (a remote one's upload completes in
        ``publish``)."""
        size = self.bin.tell()
        if not self.remote:
            self.bin.close()
        return size

    def outputs(self, rejects: bool) -> dict[str, str]:
        """The files this writer publishes (``rejects``: whether a rejects file was written)."""
        files = {s.lstrip("."): self.prefix + s for s in SUFFIXES}
        if rejects:
            files["rejects"] = self.prefix + REJECTS
        return files

    def publish(self, rejects: bool) -> None:
        """Give the sealed files their final names: .bin, .idx, rejects, the manifest (if
        written) last, after removing the old output's files in ``STALE_ORDER``."""
        names = list(SUFFIXES) + ([REJECTS] if rejects else [])
        names += [MANIFEST] if os.path.exists(self.tmp + MANIFEST) else []
        remove_stale(self.prefix, self.storage_options)
        if not self.remote:
            for s in names:
                os.replace(self.tmp + s, self.prefix + s)
            return
        fs, path = filesystem(self.prefix, self.storage_options)
        uploaded: list[str] = []
        try:
            self.bin.close()  # completes the multipart upload: the .bin appears now
            uploaded.append(".bin")
            fs.invalidate_cache()
            if fs.size(path + ".bin") != self.bin.size:
                raise OSError(f"upload of {self.prefix}.bin is incomplete: "
                              f"{fs.size(path + '.bin')} of {self.bin.size} bytes arrived")
            for s in names[1:]:  # .idx, rejects, the manifest last
                upload_file(self.tmp + s, self.prefix + s, self.storage_options, self._spill)
                uploaded.append(s)
        except BaseException:
            self.bin.abort()
            for s in reversed(uploaded):  # leave no .idx or .bin of a half-published output
                with contextlib.suppress(Exception):
                    fs.rm_file(path + s)
            raise
        shutil.rmtree(self._spill, ignore_errors=True)

    def abort(self) -> None:
        """Delete every temporary file and abort the .bin's multipart upload."""
        if self.remote:
            self.bin.abort()
        if not self.bin.closed:
            self.bin.close()
        remove_temporary(self.temporary_paths())

    def temporary_paths(self) -> list[str]:
        """Every path this run may leave behind until it publishes (files, then the spill
        directory)."""
        return [self.tmp + s for s in list(SUFFIXES) + [REJECTS, MANIFEST]] + (
            [self._spill] if self._spill else [])
