"""Local paths and object storage (oss://, s3://, any fsspec URL) behind one small interface.

Credentials come from ``storage_options`` or from each ecosystem's usual environment variables
(``OSS_ACCESS_KEY_ID``/``OSS_ACCESS_KEY_SECRET``/``OSS_ENDPOINT``; ``AWS_*`` through botocore).
They are never printed: ``redact`` is applied to anything that goes to a log or the manifest.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

SECRET_WORDS = ("key", "secret", "token", "password", "credential")
_OSS_ENV = {"key": "OSS_ACCESS_KEY_ID", "secret": "OSS_ACCESS_KEY_SECRET",
            "endpoint": "OSS_ENDPOINT"}


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in ("file", "local")


def options_for(url: str, storage_options: dict | None = None) -> dict:
    """The fsspec options for ``url``: the configured ones, else the environment's."""
    opts = dict(storage_options or {})
    if protocol(url) == "oss":
        for name, env in _OSS_ENV.items():
            if name not in opts and os.environ.get(env):
                opts[name] = os.environ[env]
    return opts if is_remote(url) else {}


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path within it)`` for a local path or URL."""
    return url_to_fs(url, **options_for(url, storage_options))


def redact(value: Any) -> Any:
    """A copy of ``value`` with every secret-looking mapping entry replaced by ``***``."""
    if isinstance(value, dict):
        return {k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) and v else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
