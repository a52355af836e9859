"""Local paths and object storage (oss://, s3://, any fsspec URL) behind one small interface.

Options are fsspec's keyword arguments. Flat entries apply to every remote protocol; entries
under a protocol's name apply to that protocol only (fsspec's own convention), so one config can
read from OSS and write to S3::

    source:
      storage_options:
        oss: {endpoint: https://oss-cn-hangzhou-internal.aliyuncs.com}
        s3: {client_kwargs: {endpoint_url: http://minio:9000}}

Credentials and endpoints the options leave out come from each ecosystem's environment variables:
``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``, ``OSS_SESSION_TOKEN``, ``OSS_ENDPOINT`` for
oss://; ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION`` for s3://.

Ray workers on a cluster do not have the driver's environment, so the driver gives its read tasks
and its writer ``resolve_options(...)``: the options with the environment's values written in.
They travel as task arguments, never in a ``runtime_env`` (the dashboard shows those). Nothing
here prints them; ``redact`` is applied to the configuration the manifest records.

Writes to a store go through ``sink.MultipartSink``: the store's multipart API, part by part
(ossfs cannot stream writes over 5 MiB).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

MiB = 1 << 20

SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "signature")
_CREDENTIALS = ("key", "secret", "token", "profile", "anon")  # any one: the user chose them all
_ENV = {
    "oss": {"key": "OSS_ACCESS_KEY_ID", "secret": "OSS_ACCESS_KEY_SECRET",
            "token": "OSS_SESSION_TOKEN"},
    "s3": {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY",
           "token": "AWS_SESSION_TOKEN"},
}


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in ("file", "local")


def _family(proto: str) -> str:
    return "s3" if proto == "s3a" else proto


def _is_section(name: str, value: Any) -> bool:
    return isinstance(value, dict) and name in fsspec.available_protocols()


def options_for(url: str, storage_options: dict | None = None) -> dict:
    """The fsspec options for ``url``: the flat ones, its protocol's section, the environment."""
    if not is_remote(url):
        return {}
    given = storage_options or {}
    proto = protocol(url)
    opts = copy.deepcopy({k: v for k, v in given.items() if not _is_section(k, v)})
    opts.update(copy.deepcopy(given.get(proto) or {}))
    family = _family(proto)
    if family in _ENV and not any(opts.get(name) for name in _CREDENTIALS):
        for name, env in _ENV[family].items():
            if os.environ.get(env):
                opts[name] = os.environ[env]
    if family == "oss" and not opts.get("endpoint") and os.environ.get("OSS_ENDPOINT"):
        opts["endpoint"] = os.environ["OSS_ENDPOINT"]
    if family == "s3":
        client = opts.setdefault("client_kwargs", {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and not (opts.get("endpoint_url") or client.get("endpoint_url")):
            client["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region and not client.get("region_name"):
            client["region_name"] = region
        if not client:
            del opts["client_kwargs"]
    return opts


def resolve_options(urls: list[str], storage_options: dict | None = None) -> dict:
    """``storage_options`` made complete for ``urls`` in a process without this environment.

    Each remote protocol among ``urls`` gets a section holding its complete options, the
    environment's credentials and endpoint included. Give the result, not the configured
    options, to anything that runs in a Ray worker. With ``OSS_*`` set::

        resolve_options(["oss://bkt/a.jsonl"], {})
        # {'oss': {'key': 'LTAI…', 'secret': '…', 'endpoint': 'https://oss-…aliyuncs.com'}}
    """
    resolved = copy.deepcopy(dict(storage_options or {}))
    for proto in sorted({protocol(u) for u in urls if is_remote(u)}):
        resolved[proto] = options_for(proto + "://", storage_options)
    return resolved


def filesystem(url: str, storage_options: dict | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path within it)`` for a local path or URL.

    A fresh instance every time: fsspec caches instances and their listings per process, and a
    listing cached before another process wrote there would be stale.
    """
    fs, path = url_to_fs(url, skip_instance_cache=True, **options_for(url, storage_options))
    if _family(protocol(url)) == "oss":
        # ossfs keeps a leading "/" ("/bkt/key") that its find() and glob() pass on, making
        # unstrip_protocol give "oss:///bkt/key", which ossfs then reads as an empty file.
        path = path.lstrip("/")
    return fs, path


def redact(value: Any) -> Any:
    """A copy of a configuration tree with the secrets of every ``storage_options`` in it
    replaced by ``***`` (see ``redact_options``); other values are kept as they are."""
    if isinstance(value, dict):
        return {k: redact_options(v) if k == "storage_options" else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_options(options: Any) -> Any:
    """A copy of storage options with every secret-looking entry (key, secret, token,
    password, ...) replaced by ``***``, at any depth."""
    if isinstance(options, dict):
        return {k: "***" if v and any(w in str(k).lower() for w in SECRET_WORDS)
                else redact_options(v) for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return options
