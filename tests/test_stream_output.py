"""A remote output larger than a few parts streams to the store: 200+ MB through the loopback S3
and OSS servers with the spill directory never above a few parts, the local build's bytes, and an
aborted run leaving no object and no pending multipart upload.

The writer class is driven directly with the tokenizer stage's blocks (the end-to-end pipeline
to a store is tests/test_remote.py); ``--packing none`` at a large S makes 32 KiB documents from
short samples, so 200 MB cost little tokenizing.
"""

from __future__ import annotations

import os
import threading
import uuid

import oss2
import pytest

from object_store import oss_server, s3_server
from sftprep.sink import FIRST_PART, MAX_PENDING, MultipartSink, part_size
from sftprep.storage import MiB
from sftprep.writer import SFTWriter
from test_writer import end, sample, table

S, PAD = 4096, 1000
BLOCKS, ROWS = 50, 130  # 6,500 documents of 2*S int32: 213 MB
SERVERS = {"s3": s3_server, "oss": oss_server}


@pytest.fixture(scope="module")
def blocks():
    out, line = [], 0
    for b in range(BLOCKS):
        rows = []
        for _ in range(ROWS):
            line += 1
            ids, trained = sample(20 + line % 200, line)
            rows.append({"file": 0, "line": line, "input_ids": ids, "trained": trained})
        if b == BLOCKS - 1:
            rows.append(end(lines=line))  # the read task's end row
        out.append(table(rows))
    return out


@pytest.fixture(scope="module")
def local_bytes(blocks, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("local") / "big_text_document")
    w = SFTWriter(prefix, ["data.jsonl"], S, PAD)
    for t in blocks:
        w.consume(t)
    w.finish({})
    return {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request):
    with SERVERS[request.param]() as store:
        yield store


class SpillWatch:
    """Samples the bytes under a directory every few milliseconds; keeps the peak."""

    def __init__(self, root: str):
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for d, _, names in os.walk(self.root):
                for n in names:
                    try:
                        total += os.path.getsize(os.path.join(d, n))
                    except FileNotFoundError:  # a part sent meanwhile
                        pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.005)

    def __enter__(self) -> SpillWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pending_uploads(store, bucket: str) -> list[str]:
    """Keys with an unfinished multipart upload, asked of the server with the store's API."""
    if store.protocol == "s3":
        reply = store.filesystem().call_s3("list_multipart_uploads", Bucket=bucket)
        return [u["Key"] for u in reply.get("Uploads", [])]
    auth = oss2.Auth(store.storage_options["key"], store.storage_options["secret"])
    listing = oss2.Bucket(auth, store.endpoint, bucket).list_multipart_uploads()
    return [u.key for u in listing.upload_list]


def test_a_200mb_remote_output_streams_through_a_few_parts(store, blocks, local_bytes,
                                                           tmp_path):
    bucket = f"big-{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    url = f"{store.protocol}://{bucket}/out/big_text_document"
    spill = tmp_path / "spill"
    spill.mkdir()
    w = SFTWriter(url, ["data.jsonl"], S, PAD, storage_options=store.storage_options,
                  spill_dir=str(spill))
    with SpillWatch(str(spill)) as watch:
        for t in blocks:
            w.consume(t)
        assert pending_uploads(store, bucket) == ["out/big_text_document.bin"]
        assert not store.filesystem().exists(f"{bucket}/out/big_text_document.bin")
        w.finish({})
    size = len(local_bytes[".bin"])
    assert size > 200e6
    few_parts = (MAX_PENDING + 1) * FIRST_PART
    assert w.files.bin.peak_spill <= few_parts
    assert watch.peak <= few_parts + len(local_bytes[".idx"]), (watch.peak, few_parts)
    assert os.listdir(spill) == []
    fs = store.filesystem()
    assert fs.cat(f"{bucket}/out/big_text_document.bin") == local_bytes[".bin"]
    assert fs.cat(f"{bucket}/out/big_text_document.idx") == local_bytes[".idx"]
    assert fs.exists(f"{bucket}/out/big_text_document.manifest.json")
    assert pending_uploads(store, bucket) == []
    if store.protocol == "s3":  # one streamed part per FIRST_PART bytes
        assert fs.info(f"{bucket}/out/big_text_document.bin")["ETag"].endswith(
            f'-{-(-size // FIRST_PART)}"')


def test_an_aborted_run_leaves_no_object_and_no_pending_upload(store, blocks, tmp_path):
    bucket = f"abort-{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    url = f"{store.protocol}://{bucket}/out/big_text_document"
    w = SFTWriter(url, ["data.jsonl"], S, PAD, storage_options=store.storage_options,
                  spill_dir=str(tmp_path))
    for t in blocks[:12]:  # 51 MB: parts already on the server
        w.consume(t)
    assert w.files.bin.size > 3 * FIRST_PART
    assert pending_uploads(store, bucket) == ["out/big_text_document.bin"]
    w.abort()
    assert pending_uploads(store, bucket) == []
    assert not store.filesystem().find(bucket)  # no object at all
    assert os.listdir(tmp_path) == []


def test_a_refused_upload_names_the_object_and_leaves_no_parts(store, tmp_path):
    url = f"{store.protocol}://no-such-{uuid.uuid4().hex[:12]}/y.bin"
    with pytest.raises(FileNotFoundError, match=f"upload to {url} failed"):
        with MultipartSink(url, store.storage_options, str(tmp_path), first_part=MiB) as sink:
            sink.write(b"x" * (3 * MiB))
    assert os.listdir(tmp_path) == []


def test_part_sizes_grow_to_reach_terabytes():
    assert part_size(1) == part_size(1000) == FIRST_PART
    assert part_size(1001) == 2 * FIRST_PART
    assert sum(part_size(n) for n in range(1, 10_001)) > 8e12
