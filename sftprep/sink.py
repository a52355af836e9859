"""A remote object written while its data arrives: the store's multipart upload, part by part.

``MultipartSink(url)`` is a write-only file. Bytes go to a local part file in a spill
directory; each full part is uploaded by a thread and its file deleted, so local disk holds at
most ``MAX_PENDING`` parts being uploaded plus the one being filled, whatever the object's size.
The object appears only at ``close()`` (complete_multipart_upload); ``abort()`` or any failure
aborts the upload, leaving neither an object nor a pending multipart upload on the server.
An object smaller than one part goes up in one PUT at ``close()``.

The stores' multipart APIs are used directly (S3 through s3fs's botocore client, OSS through
oss2): ossfs's streaming writes break past 5 MiB. Other fsspec URLs fall back to ``fs.open``.

Part sizes: ``FIRST_PART`` for the first 1000 parts, then doubling every 1000 parts, so the
10,000 parts both stores allow reach ~8 TB while small outputs still stream in small parts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from sftprep.storage import MiB, filesystem, options_for, protocol

FIRST_PART = 8 * MiB
PARTS_PER_SIZE = 1000
MAX_PART = 5 * 1024 * MiB  # both stores' largest part
MAX_PENDING = 2  # parts uploading at once (each also on local disk until sent)


def part_size(number: int, first: int = FIRST_PART) -> int:
    """Size of part ``number`` (from 1)."""
    return min(MAX_PART, first << ((number - 1) // PARTS_PER_SIZE))


class _S3:
    def __init__(self, url: str, storage_options: dict | None):
        self.fs, path = filesystem(url, storage_options)
        self.bucket, _, self.key = path.partition("/")
        self.name = self.bucket
        self.upload_id = None

    def pending(self) -> list[tuple[str, str]]:
        """``(key, upload id)`` of the uploads under ``key`` not completed or aborted, oldest
        first."""
        found, kw = [], {"Bucket": self.bucket, "Prefix": self.key}
        while True:
            r = self.fs.call_s3("list_multipart_uploads", **kw)
            found += [(u["Initiated"], u["Key"], u["UploadId"]) for u in r.get("Uploads", [])]
            if not r.get("IsTruncated"):
                return [(key, upload) for _, key, upload in sorted(found)]
            kw.update(KeyMarker=r["NextKeyMarker"], UploadIdMarker=r["NextUploadIdMarker"])

    def start(self) -> None:
        r = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
        self.upload_id = r["UploadId"]

    def part(self, number: int, data: bytes) -> str:
        r = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key,
                            UploadId=self.upload_id, PartNumber=number, Body=data)
        return r["ETag"]

    def complete(self, etags: list[str]) -> None:
        parts = [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
        self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                        UploadId=self.upload_id, MultipartUpload={"Parts": parts})

    def abort(self) -> None:
        self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                        UploadId=self.upload_id)

    def put(self, data: bytes) -> None:
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data)


class _OSS:
    def __init__(self, url: str, storage_options: dict | None):
        import oss2

        self.oss2 = oss2
        _, path = filesystem(url, storage_options)
        bucket, _, self.key = path.partition("/")
        self.bucket = oss_bucket(options_for(url, storage_options), bucket)
        self.name = bucket
        self.upload_id = None

    def pending(self) -> list[tuple[str, str]]:
        found = self.oss2.MultipartUploadIterator(self.bucket, prefix=self.key)
        return [(u.key, u.upload_id) for u in sorted(found, key=lambda u: u.initiation_date)]

    def start(self) -> None:
        self.upload_id = self.bucket.init_multipart_upload(self.key).upload_id

    def part(self, number: int, data: bytes) -> str:
        return self.bucket.upload_part(self.key, self.upload_id, number, data).etag

    def complete(self, etags: list[str]) -> None:
        parts = [self.oss2.models.PartInfo(n, e) for n, e in enumerate(etags, 1)]
        self.bucket.complete_multipart_upload(self.key, self.upload_id, parts)

    def abort(self) -> None:
        self.bucket.abort_multipart_upload(self.key, self.upload_id)

    def put(self, data: bytes) -> None:
        self.bucket.put_object(self.key, data)


def oss_bucket(opts: dict, name: str):
    """An ``oss2.Bucket`` from resolved OSS storage options."""
    import oss2

    endpoint = opts.get("endpoint")
    if not endpoint:
        raise ValueError("no OSS endpoint: set OSS_ENDPOINT or source.storage_options.endpoint "
                         "(e.g. https://oss-cn-hangzhou-internal.aliyuncs.com)")
    key, secret, token = opts.get("key"), opts.get("secret"), opts.get("token")
    auth = (oss2.StsAuth(key, secret, token) if token else oss2.Auth(key, secret) if key
            else oss2.AnonymousAuth())
    return oss2.Bucket(auth, endpoint, name)


class _Fsspec:
    """Any other fsspec store: its own buffered writer (no abortable multipart)."""

    def __init__(self, url: str, storage_options: dict | None):
        self.fs, self.path = filesystem(url, storage_options)
        self.file = None
        self.upload_id = None

    def pending(self) -> list[tuple[str, str]]:
        return []  # nothing a run could leave pending

    def start(self) -> None:
        self.file = self.fs.open(self.path, "wb")

    def part(self, number: int, data: bytes) -> str:
        self.file.write(data)
        return ""

    def complete(self, etags: list[str]) -> None:
        self.file.close()

    def abort(self) -> None:
        self.file.discard() if hasattr(self.file, "discard") else self.file.close()
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)

    def put(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)


def _store_error(url: str, e: Exception) -> OSError:
    """The stores' errors as OSError subclasses naming the object (their messages often don't)."""
    status = getattr(e, "status", None)
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") \
        else getattr(e, "code", None)
    if status == 404 or code in ("NoSuchBucket", "404"):
        kind = FileNotFoundError
    elif status == 403 or code in ("AccessDenied", "403"):
        kind = PermissionError
    else:
        kind = type(e) if isinstance(e, OSError) else OSError
    detail = getattr(e, "message", None) or str(e)
    if code == "NoSuchBucket" and "bucket does not exist" not in detail:
        detail += " (the bucket does not exist)"
    return kind(f"upload to {url} failed: {detail}")


def _store(url: str, storage_options: dict | None):
    family = "s3" if protocol(url) in ("s3", "s3a") else protocol(url)
    return {"s3": _S3, "oss": _OSS}.get(family, _Fsspec)(url, storage_options)


def pending_uploads(url_prefix: str, storage_options: dict | None = None
                    ) -> list[tuple[str, str]]:
    """``(object URL, upload id)`` of every multipart upload under ``url_prefix`` that was
    neither completed nor aborted, oldest first: parts billed as storage, and invisible in a
    listing of the objects."""
    store = _store(url_prefix, storage_options)
    scheme = protocol(url_prefix)
    return [(f"{scheme}://{store.name}/{key}", upload) for key, upload in store.pending()]


def abort_upload(url: str, upload_id: str, storage_options: dict | None = None) -> None:
    """Abort the multipart upload ``upload_id`` of ``url`` (its parts are deleted)."""
    store = _store(url, storage_options)
    store.upload_id = upload_id
    try:
        store.abort()
    except Exception as e:
        raise _store_error(url, e) from e


class MultipartSink:
    """Write-only file streaming to ``url`` in parts through ``spill_dir`` (see the module)."""

    def __init__(self, url: str, storage_options: dict | None = None,
                 spill_dir: str | None = None, first_part: int = FIRST_PART):
        self.url = url
        self.store = _store(url, storage_options)
        self.first_part = first_part
        self.dir = tempfile.mkdtemp(prefix="sftprep-parts-", dir=spill_dir)
        self.size = 0
        self.peak_spill = 0  # most bytes of part files on local disk at once
        self._number = 1  # the part being filled
        self._file = self._open_part()
        self._filled = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._etags: list[str] = []
        self._spilled = 0  # bytes in part files not yet sent
        self._lock = threading.Lock()
        self.closed = False

    def _open_part(self):
        return open(os.path.join(self.dir, f"part-{self._number:05d}"), "wb")

    @property
    def upload_id(self) -> str | None:
        """The store's id of this object's multipart upload, once its first part is sent."""
        return self.store.upload_id

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            room = part_size(self._number, self.first_part) - self._filled
            chunk = view[:room]
            self._file.write(chunk)
            self._filled += len(chunk)
            with self._lock:
                self._spilled += len(chunk)
                self.peak_spill = max(self.peak_spill, self._spilled)
            view = view[len(chunk):]
            if self._filled == part_size(self._number, self.first_part):
                self._send_part()
        self.size += n
        return n

    def _send_part(self) -> None:
        self._file.close()
        if self._pool is None:
            try:
                self.store.start()
            except Exception as e:
                raise _store_error(self.url, e) from e
            self._pool = ThreadPoolExecutor(MAX_PENDING, thread_name_prefix="sftprep-upload")
        while len(self._pending) >= MAX_PENDING:
            self._etags.append(self._result(self._pending.popleft()))
        self._pending.append(self._pool.submit(self._upload, self._number, self._file.name))
        self._number += 1
        self._file = self._open_part()
        self._filled = 0

    def _upload(self, number: int, path: str) -> str:
        with open(path, "rb") as f:
            data = f.read()
        etag = self.store.part(number, data)
        os.remove(path)
        with self._lock:
            self._spilled -= len(data)
        return etag

    def _result(self, future: Future) -> str:
        try:
            return future.result()
        except Exception as e:
            raise _store_error(self.url, e) from e

    def close(self) -> None:
        """Send what is left and complete the upload: the object appears now, whole."""
        if self.closed:
            return
        try:
            self._file.close()
            if self._pool is None:  # under one part: a single PUT
                with open(self._file.name, "rb") as f:
                    data = f.read()
                try:
                    self.store.put(data)
                except Exception as e:
                    raise _store_error(self.url, e) from e
            else:
                if self._filled:
                    self._send_part()
                while self._pending:
                    self._etags.append(self._result(self._pending.popleft()))
                try:
                    self.store.complete(self._etags)
                except Exception as e:
                    raise _store_error(self.url, e) from e
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.abort()
            raise
        self._cleanup()

    def abort(self) -> None:
        """Abort the multipart upload (no object, no pending upload left) and drop the parts."""
        if self.closed:
            return
        if not self._file.closed:
            self._file.close()
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)
            self.store.abort()
        self._cleanup()

    def _cleanup(self) -> None:
        self.closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def __enter__(self) -> MultipartSink:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.abort() if kind else self.close()


def upload_file(local: str, url: str, storage_options: dict | None = None,
                spill_dir: str | None = None) -> None:
    """Copy the local file ``local`` to ``url`` (in parts beyond one part's size)."""
    with open(local, "rb") as src, MultipartSink(url, storage_options, spill_dir) as sink:
        for chunk in iter(lambda: src.read(MiB), b""):
            sink.write(chunk)
