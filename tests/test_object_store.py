"""The loopback S3 / OSS servers work with the real s3fs / ossfs clients."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import threading
import time
import uuid

import fsspec
import oss2
import ossfs.core
import pytest

from object_store import oss_server, s3_server

MiB = 2**20
SERVERS = {"s3": s3_server, "oss": oss_server}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request):
    with SERVERS[request.param]() as store:
        yield store


@pytest.fixture
def bucket(store):
    """A fresh bucket per test: all servers share moto's state."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    store.create_bucket(name)
    return name


@pytest.fixture
def fs(store):
    return store.filesystem()


def names(paths):
    # ossfs names directories "bkt/dir/", s3fs "bkt/dir"
    return sorted(p.rstrip("/") for p in paths)


def test_store_shape(store):
    assert store.endpoint.startswith("http://127.0.0.1:")
    assert store.protocol in ("s3", "oss")
    assert store.endpoint in str(store.storage_options)
    assert store.endpoint in store.env.values()


def test_mkdir_bucket(fs, store):
    name = f"mk-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    buckets = [b.strip("/") for b in fs.ls("/", detail=False)]  # ossfs names them "/bkt"
    if store.protocol == "s3":
        assert name in buckets
    else:
        assert name not in buckets  # ossfs's mkdir is a no-op: use store.create_bucket
        store.create_bucket(name)
        fs.invalidate_cache()
        assert name in [b.strip("/") for b in fs.ls("/", detail=False)]


def test_pipe_cat_ls_glob(fs, bucket):
    files = {
        f"{bucket}/data/a.jsonl": b'{"a": 1}\n',
        f"{bucket}/data/b.jsonl": b'{"b": 2}\n',
        f"{bucket}/data/sub/c.jsonl.gz": b"\x1f\x8b fake gzip",
    }
    fs.pipe(files)
    assert fs.cat(f"{bucket}/data/a.jsonl") == b'{"a": 1}\n'
    assert fs.cat(f"{bucket}/data/*.jsonl") == {k: v for k, v in files.items() if "sub" not in k}
    assert names(fs.ls(f"{bucket}/data", detail=False)) == [
        f"{bucket}/data/a.jsonl",
        f"{bucket}/data/b.jsonl",
        f"{bucket}/data/sub",
    ]
    assert fs.glob(f"{bucket}/data/*.jsonl") == [f"{bucket}/data/a.jsonl", f"{bucket}/data/b.jsonl"]
    assert fs.glob(f"{bucket}/data/**/*.gz") == [f"{bucket}/data/sub/c.jsonl.gz"]
    assert fs.find(f"{bucket}/data") == sorted(files)
    assert fs.isdir(f"{bucket}/data/sub") and fs.isfile(f"{bucket}/data/a.jsonl")
    assert fs.exists(f"{bucket}/data/a.jsonl") and not fs.exists(f"{bucket}/data/nope.jsonl")
    assert fs.size(f"{bucket}/data/sub/c.jsonl.gz") == len(files[f"{bucket}/data/sub/c.jsonl.gz"])


def test_cat_file_range(fs, bucket, store):
    fs.pipe(f"{bucket}/r.bin", b"0123456789")
    got = fs.cat_file(f"{bucket}/r.bin", start=2, end=5)
    # ossfs bug: it hands `end` to oss2 as an inclusive range end, so one byte too many.
    assert got == (b"2345" if store.protocol == "oss" else b"234")


def test_streaming_read_and_seek(fs, bucket):
    data = os.urandom(300_000)
    path = f"{bucket}/stream.bin"
    fs.pipe(path, data)
    assert fs.size(path) == len(data)
    # small blocks, so that reading takes many ranged GETs
    with fs.open(path, "rb", block_size=64 * 1024) as f:
        chunks = iter(lambda: f.read(10_000), b"")
        assert b"".join(chunks) == data
        assert f.seek(123_456) == 123_456
        assert f.read(1000) == data[123_456:124_456]
        assert f.tell() == 124_456
        f.seek(-500, os.SEEK_END)
        assert f.read() == data[-500:]
        f.seek(7)
        assert f.read(3) == data[7:10]


def test_put_file_multipart_roundtrip(fs, bucket, store, tmp_path, monkeypatch):
    data = os.urandom(12 * MiB + 123)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    path = f"{bucket}/big/put.bin"
    if store.protocol == "s3":
        fs.put_file(str(local), path, chunksize=5 * MiB)  # default chunksize is 50 MiB
        assert fs.info(path)["ETag"].endswith('-3"')  # an S3 multipart ETag: 3 parts
    else:
        # ossfs multiparts only from 100 MiB (oss2's multiget_threshold); lower it.
        monkeypatch.setattr(ossfs.core, "SIMPLE_TRANSFER_THRESHOLD", 5 * MiB)
        store.request_log.clear()
        fs.put_file(
            str(local),
            path,
            multipart_threshold=5 * MiB,
            part_size=5 * MiB,
            store=oss2.ResumableStore(root=str(tmp_path)),  # default writes under $HOME
        )
        assert sum("?uploadId=" in p and "partNumber=" in p for _, p in store.request_log) == 3
    assert fs.size(path) == len(data)
    assert fs.cat(path) == data
    fs.get_file(path, str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data


def test_pipe_large_is_multipart(fs, bucket, store):
    data = os.urandom(11 * MiB)
    path = f"{bucket}/big/pipe.bin"
    if store.protocol == "s3":
        fs.pipe(path, data, chunksize=5 * MiB)
        assert fs.info(path)["ETag"].endswith('-3"')
    else:
        store.request_log.clear()
        fs.pipe(path, data)  # ossfs: multipart from 2 blocks (10 MiB) on
        assert any(p.endswith("?uploads=") for _, p in store.request_log)
    assert fs.cat(path) == data


@pytest.mark.parametrize("mib", [3, 12], ids=["small", "over_5mib"])
def test_streaming_write(fs, bucket, store, request, mib):
    if store.protocol == "oss" and mib > 5:
        # Known ossfs bug, reproduced against this adapter exactly as against real OSS:
        # OSSFile keeps its append position in `self.loc`, which fsspec's
        # AbstractBufferedFile.write() also bumps per write, so the second append
        # (after the first 5 MiB block) asks for a too-high position and the server
        # answers 409 PositionNotEqualToLength (an OSError). One single write() of
        # everything, or put_file/pipe, works.
        request.applymarker(pytest.mark.xfail(raises=OSError, strict=False, reason="ossfs OSSFile.loc bug"))
    path = f"{bucket}/w/{mib}.bin"
    data = os.urandom(mib * MiB)
    with fs.open(path, "wb") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i : i + MiB])
    assert fs.cat(path) == data


def test_rm(fs, bucket):
    fs.pipe({f"{bucket}/x/1": b"1", f"{bucket}/x/2": b"2", f"{bucket}/x/d/3": b"3", f"{bucket}/keep": b"k"})
    fs.rm(f"{bucket}/x/1")
    assert not fs.exists(f"{bucket}/x/1")
    fs.rm(f"{bucket}/x", recursive=True)
    assert fs.find(bucket) == [f"{bucket}/keep"]


@contextlib.contextmanager
def configured_by_env(server):
    """A store whose address and credentials are only in the environment, and a fresh bucket."""
    with server as store, pytest.MonkeyPatch.context() as mp:
        for name, value in store.env.items():
            mp.setenv(name, value)
        name = f"env-{uuid.uuid4().hex[:12]}"
        store.create_bucket(name)
        yield store, name


def test_s3_env_vars():
    """Plain fsspec.filesystem("s3") works from the env vars alone: botocore reads AWS_ENDPOINT_URL."""
    with configured_by_env(s3_server()) as (store, name):
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.pipe(f"{name}/x", b"via env")
        assert fs.cat(f"{name}/x") == b"via env"


def test_oss_env_vars():
    """ossfs reads OSS_ENDPOINT only; without key/secret it is anonymous, which OSS refuses."""
    with configured_by_env(oss_server()) as (store, name):
        anonymous = fsspec.filesystem("oss", skip_instance_cache=True)
        assert anonymous._endpoint == store.endpoint
        with pytest.raises(PermissionError):
            anonymous.pipe(f"{name}/x", b"no")
        fs = fsspec.filesystem(
            "oss",
            key=os.environ["OSS_ACCESS_KEY_ID"],
            secret=os.environ["OSS_ACCESS_KEY_SECRET"],
            skip_instance_cache=True,
        )
        fs.pipe(f"{name}/x", b"via env")
        assert fs.cat(f"{name}/x") == b"via env"


def test_oss_protocol_details():
    """What the adapter translates, checked through oss2 itself."""
    with oss_server() as store:
        store.create_bucket("proto")
        auth = oss2.Auth(store.storage_options["key"], store.storage_options["secret"])
        bkt = oss2.Bucket(auth, store.endpoint, "proto")
        assert bkt.get_bucket_info().name == "proto"
        assert "proto" in [b.name for b in oss2.BucketIterator(oss2.Service(auth, store.endpoint))]
        # append: positions are checked like on OSS
        assert bkt.append_object("log", 0, b"ab").next_position == 2
        assert bkt.append_object("log", 2, b"cd").next_position == 4
        with pytest.raises(oss2.exceptions.PositionNotEqualToLength):
            bkt.append_object("log", 3, b"x")
        assert bkt.get_object("log").read() == b"abcd"
        assert bkt.object_exists("log") and not bkt.object_exists("nope")
        # paged V1 listing (ossfs uses 100 per page) returns each entry once
        for key in ["a", "b", "c", "d/1", "e/1", "e/2", "f"]:
            bkt.put_object(f"ls/{key}", b"")
        listed = [o.key for o in oss2.ObjectIterator(bkt, prefix="ls/", delimiter="/", max_keys=2)]
        assert listed == ["ls/a", "ls/b", "ls/c", "ls/d/", "ls/e/", "ls/f"]
        # copy uses x-oss-copy-source
        bkt.copy_object("proto", "log", "log2")
        assert bkt.get_object("log2").read() == b"abcd"
        # virtual-host addressing (bucket in the Host header); anonymous access refused
        port = store.endpoint.rsplit(":", 1)[1]
        for auth_header, status, body in [({"Authorization": "OSS testing:sig"}, 200, b"abcd"), ({}, 403, None)]:
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
            conn.request("GET", "/log", headers={"Host": f"proto.localhost:{port}", **auth_header})
            resp = conn.getresponse()
            assert resp.status == status
            assert body is None or resp.read() == body
            conn.close()


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_start_fast_and_stop_clean(kind):
    before = set(threading.enumerate())
    t0 = time.monotonic()
    with SERVERS[kind]() as store:
        assert time.monotonic() - t0 < 5
        store.create_bucket(f"life-{uuid.uuid4().hex[:12]}")
        port = int(store.endpoint.rsplit(":", 1)[1])
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leftover
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
