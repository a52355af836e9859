"""Where a tokenizer's files come from: a local directory, an object-store directory or a hub id.

``--tokenizer`` takes any of::

    /models/qwen3-8b                 a local directory, used in place
    oss://bkt/models/qwen3-8b/       an object-store directory (oss://, s3://, any fsspec URL)
    Qwen/Qwen3-8B  Qwen/Qwen3-8B@<revision>
                                     a hub id, with a branch, tag or commit after "@"

``kind`` decides which, in this one place; ``check`` is the configuration's test (no network).
``resolve`` runs once, on the driver, and brings the tokenizer's files (``PATTERNS``, never
weights) into a local directory; the workers get the loaded tokenizer from the driver
(``encode.Setup``), not the files. It returns what it resolved for the manifest: the hub id, the
revision asked for and the commit found, or the object URLs and their etags, and every file's
sha256 (``tokenizer.files``), so a build can be traced to the exact files.

- An object-store directory is copied into ``$SFTPREP_CACHE/tokenizers`` (default
  ``~/.cache/sftprep``), one folder per URL, reused while its objects' etags stay the same.
- A hub id comes from the Hugging Face hub through huggingface_hub's own cache, with its usual
  variables read at the call: ``HF_ENDPOINT`` (a mirror), ``HF_TOKEN``, ``HF_HOME`` /
  ``HF_HUB_CACHE``, and ``HF_HUB_OFFLINE=1``, which reads the cache only. With
  ``USE_MODELSCOPE_HUB=1`` (LLaMA-Factory's switch) it comes from ModelScope instead, through
  the ``modelscope`` package.

The tokenizer prepared from the files (``encode.Setup``) is kept too, in
``$SFTPREP_CACHE/prepared`` (``prepared_key``, ``load_prepared``, ``keep_prepared``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from sftprep.config import ConfigError, given
from sftprep.storage import filesystem, is_remote, protocol

# What AutoTokenizer reads: the tokenizer itself, its vocabulary in any of the usual forms, the
# chat template, and config.json (to find the tokenizer class when tokenizer_config.json does
# not name it). Weights never match.
PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken",
            "chat_template.jinja", "chat_template.json", "config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
TRUE = ("1", "on", "yes", "true")
SOURCE_FILE = ".sftprep-source.json"  # in an object-store copy: the etags it was made from


@dataclass
class Resolved:
    """A tokenizer's local directory and what it was resolved from."""

    path: str
    source: dict                                   # kind and id/revision/commit, or url/etags
    files: dict = field(default_factory=dict)      # tokenizer file name -> sha256


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in PATTERNS)


def kind(value: str) -> str:
    """``local``, ``store`` or ``hub`` for what the user typed; ``ConfigError`` for none."""
    if os.path.isdir(value):
        return "local"
    if is_remote(value):
        return "store"
    if HUB_ID.match(value) and not os.path.exists(value):
        return "hub"
    raise ConfigError(f"{given('template.tokenizer', value)} is not a directory, nor an object-store URL "
                      "(oss://bkt/dir, s3://bkt/dir) or a hub id (Qwen/Qwen3-8B, "
                      "optionally @revision)")


def check(value: str) -> None:
    """Raise ``ConfigError`` unless ``value`` names a tokenizer in one of the three ways."""
    kind(value)


def resolve(value: str, storage_options: dict | None = None) -> Resolved:
    """The tokenizer ``value`` names, as a local directory (see the module's docstring)."""
    k = kind(value)
    if k == "local":
        resolved = Resolved(value, {"kind": "local"})  # as typed: errors name it so
    elif k == "store":
        resolved = _from_store(value, storage_options)
    elif _true("USE_MODELSCOPE_HUB"):
        resolved = _from_modelscope(value)
    else:
        resolved = _from_huggingface(value)
    resolved.files = file_hashes(resolved.path)
    return resolved


def pinned(manifest_tokenizer: dict) -> str | None:
    """What to resolve to get a manifest's tokenizer again: a hub id at the commit the build
    used, else the directory or URL it was given."""
    source = manifest_tokenizer.get("source") or {}
    if source.get("kind") == "hub" and source.get("commit"):
        return f"{source['id']}@{source['commit']}"
    return manifest_tokenizer.get("path")


def file_hashes(path: str) -> dict:
    """sha256 of each tokenizer file in ``path`` (``PATTERNS``), by name."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if is_tokenizer_file(name) and os.path.isfile(full):
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[name] = h.hexdigest()
    return out


def fingerprint(files: dict, tok) -> str:
    """sha256 over the tokenizer files' hashes and the effective chat template and pad token
    (``tok``: a tokenizer, or the ``encode.Setup`` made from it): the same for the same files
    wherever they came from."""
    h = hashlib.sha256()
    for name, digest in sorted(files.items()):
        h.update(f"{name}\0{digest}\0".encode())
    h.update(str(tok.chat_template).encode() + b"\0" + str(tok.pad_token).encode())
    return h.hexdigest()


# -- object stores -------------------------------------------------------------------------------

def cache_dir(kind: str = "tokenizers") -> str:
    """``$SFTPREP_CACHE/<kind>`` (default ``~/.cache/sftprep``): store copies of tokenizers, or
    ``prepared`` ones."""
    root = os.environ.get("SFTPREP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sftprep")
    return os.path.join(root, kind)


def _from_store(url: str, storage_options: dict | None) -> Resolved:
    """Copy the tokenizer files of the directory ``url`` into the cache, unless the copy there
    was made from the same objects (etags)."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        entries = []
    except Exception as e:  # the clients raise many kinds: permissions, endpoint, bucket
        raise ConfigError(f"{given('template.tokenizer', url, url)}: cannot list it: {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    files = {os.path.basename(e["name"].rstrip("/")): e for e in entries if e["type"] == "file"}
    wanted = {name: e for name, e in sorted(files.items()) if is_tokenizer_file(name)}
    if not wanted:
        held = ", ".join(sorted(files)[:8]) or "nothing"
        raise ConfigError(f"{given('template.tokenizer', url, url)}: no tokenizer files there (it holds {held}); give "
                          "the directory holding tokenizer.json or tokenizer_config.json")
    etags = {name: str(e.get("ETag") or e.get("etag") or e.get("size")).strip('"')
             for name, e in wanted.items()}
    source = {"kind": "store", "url": url, "etags": etags}
    dest = os.path.join(cache_dir(), protocol(url),
                        hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])
    if _source_of(dest) != source:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".part-", dir=os.path.dirname(dest))
        try:
            for name, e in wanted.items():
                fs.get_file(e["name"], os.path.join(tmp, name))
            with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as f:
                json.dump(source, f)
            shutil.rmtree(dest, ignore_errors=True)
            try:
                os.replace(tmp, dest)
            except OSError:  # another build put the same copy there meanwhile
                if _source_of(dest) != source:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Resolved(dest, source)


def _source_of(dest: str) -> dict | None:
    try:
        with open(os.path.join(dest, SOURCE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# -- hubs ----------------------------------------------------------------------------------------

def _split_id(value: str) -> tuple[str, str | None]:
    repo, _, revision = value.partition("@")
    return repo, revision or None


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE


def _from_huggingface(value: str) -> Resolved:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = _split_id(value)
    offline = _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"),
        "hub")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    where = f"{repo}@{revision or 'main'}"
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=cache,
                                 allow_patterns=list(PATTERNS), local_files_only=offline,
                                 endpoint=endpoint.rstrip("/"))
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE=1 is set" if offline
               else f"{endpoint} cannot be reached (set HF_ENDPOINT for a mirror)")
        raise ConfigError(f"{given('template.tokenizer', value, value)}: {how} and the Hugging Face cache {cache} holds "
                          f"no {where}; download it once with network (or set HF_HUB_CACHE to "
                          "the cache that has it), or give a local directory") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ConfigError(f"{given('template.tokenizer', value, value)}: {endpoint} has no repository {repo} this "
                          f"process may read ({type(e).__name__}; a private or gated one needs "
                          "HF_TOKEN), and there is no local directory of that name") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{given('template.tokenizer', value, value)}: {repo} has no revision "
                          f"{revision!r} on {endpoint}") from None
    return Resolved(path, {"kind": "hub", "hub": "huggingface", "id": repo,
                           "revision": revision or "main", "commit": os.path.basename(path),
                           "endpoint": endpoint})


def _from_modelscope(value: str) -> Resolved:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ConfigError(f"{given('template.tokenizer', value, value)}: USE_MODELSCOPE_HUB=1 asks for ModelScope, but "
                          "the modelscope package is not installed: pip install modelscope "
                          "(or unset USE_MODELSCOPE_HUB for the Hugging Face hub)") from None
    repo, revision = _split_id(value)
    try:
        path = snapshot_download(repo, revision=revision or "master",
                                 allow_patterns=list(PATTERNS))
    except Exception as e:  # modelscope raises its own kinds for a missing repo or network
        raise ConfigError(f"{given('template.tokenizer', value, value)}: ModelScope could not give {repo}@"
                          f"{revision or 'master'}: {type(e).__name__}: {_first_line(e)}"
                          ) from None
    return Resolved(path, {"kind": "hub", "hub": "modelscope", "id": repo,
                           "revision": revision or "master"})


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# -- prepared tokenizers -------------------------------------------------------------------------
# Loading a tokenizer with transformers and preparing it (``encode.prepare``: the fast path's
# tables and its self-check) costs the driver ~4 CPU seconds at every build's start, while Ray
# starts on the same cores. The result depends only on the files, the settings and the code,
# so it is kept on disk under a hash of all three and read back in a fraction of a second.

PREPARED_KEEP = 8  # prepared tokenizers kept, the most recently used


def prepared_key(files: dict, *settings) -> str:
    """sha256 of what a prepared tokenizer is made from: the files' hashes, ``settings`` (pad
    token, template text, backend), and the code that makes it and reads it back (sftprep's own
    modules, the installed transformers, tokenizers and numpy, this Python)."""
    h = hashlib.sha256(_code_identity())
    h.update(json.dumps([sorted(files.items()), settings]).encode())
    return h.hexdigest()


def load_prepared(key: str):
    """The prepared tokenizer kept under ``key``, or None (none kept, or not readable)."""
    path = os.path.join(cache_dir("prepared"), key)
    try:
        with open(path, "rb") as f:
            kept_key, setup = pickle.load(f)
        os.utime(path)  # recently used
    except Exception:  # noqa: BLE001 -- missing, partial or from another version: make it anew
        return None
    return setup if kept_key == key else None


def keep_prepared(key: str, setup) -> None:
    """Keep ``setup`` under ``key`` (written whole, then renamed into place); beyond
    ``PREPARED_KEEP``, the least recently used go. A cache that cannot be written is skipped."""
    folder, partial = cache_dir("prepared"), None
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".", delete=False) as f:
            partial = f.name
            pickle.dump((key, setup), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, os.path.join(folder, key))
        partial = None
        kept = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                      key=lambda e: e.stat().st_mtime, reverse=True)
        for e in kept[PREPARED_KEEP:]:
            os.remove(e.path)
    except OSError:
        pass
    finally:
        if partial:
            with contextlib.suppress(OSError):
                os.remove(partial)


@functools.lru_cache(maxsize=None)
def _code_identity() -> bytes:
    from importlib.metadata import version
    h = hashlib.sha256("\0".join([sys.version] + [version(p) for p in (
        "transformers", "tokenizers", "numpy")]).encode())
    package = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.digest()
