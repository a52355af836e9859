"""Builds that read from and write to object storage (s3:// and oss:// on loopback servers).

The Ray workers of the session runtime were started before these tests set any credential in the
environment, so, as on a cluster, they see only what the driver hands them.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fixtures import alpaca_samples
from object_store import oss_server, s3_server
from sftprep import cli
from sftprep.storage import redact, resolve_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = {"s3": s3_server, "oss": oss_server}
# How each build finds its store. OSS by the environment alone: ossfs reads no key from it, so
# this is sftprep's doing; S3 by a YAML config alone. (Resolution of the other two combinations
# is the last test's; each build here costs seconds.)
CREDENTIALS = {"oss": "env", "s3": "options"}
SECRET = "sftprep-" + uuid.uuid4().hex  # moto checks no signature: any secret is accepted
SECRET_ENV = {"s3": "AWS_SECRET_ACCESS_KEY", "oss": "OSS_ACCESS_KEY_SECRET"}
CREDENTIAL_ENV = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN",
                  "OSS_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                  "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
S = 4096  # packing none: one 2*S int32 document (32 KiB) a line
LINES = 336  # 10.5 MiB of .bin: over two 5 MiB parts, so the upload is multipart
SPLIT = 8_000  # bytes per read task: the .jsonl files (~40 KB) in ranges, the Parquet in 2


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request):
    with SERVERS[request.param]() as store:
        yield store


def _parquet(records: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink, row_group_size=16)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def dataset() -> dict[str, bytes]:
    """Relative path -> bytes: two .jsonl (one in a subdirectory), a .parquet in row groups of
    16, a .json.gz, a stray .txt. Remote builds read the JSONL and the Parquet in ranges."""
    samples = alpaca_samples(LINES, seed=5)
    lines = [json.dumps(x, ensure_ascii=False) + "\n" for x in samples]
    q = LINES // 4
    return {
        "a.jsonl": "".join(lines[:q]).encode(),
        "b.parquet": _parquet(samples[q:2 * q]),
        "c.json.gz": gzip.compress(json.dumps([json.loads(x) for x in lines[2 * q:3 * q]],
                                              ensure_ascii=False, indent=1).encode()),
        "sub/d.jsonl": "".join(lines[3 * q:]).encode(),
        "notes.txt": b"not an input\n",
    }


@pytest.fixture(scope="module")
def local_build(ray_session, qwen_dir, dataset, tmp_path_factory) -> dict[str, bytes]:
    """The same records built from local JSONL files, unsplit: the bytes every remote build
    must give."""
    root = tmp_path_factory.mktemp("local")
    lines = alpaca_samples(LINES, seed=5)[LINES // 4:LINES // 2]
    as_jsonl = {"b.jsonl" if n == "b.parquet" else n: data for n, data in dataset.items()}
    as_jsonl["b.jsonl"] = "".join(json.dumps(x, ensure_ascii=False) + "\n"
                                  for x in lines).encode()
    for name, data in as_jsonl.items():
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / name).write_bytes(data)
    prefix = root / "out" / "sft"
    cli.build(_argv(str(root / "data"), str(prefix), qwen_dir, "--split-bytes", "0"))
    return {s: (root / "out" / f"sft_text_document{s}").read_bytes() for s in (".bin", ".idx")}


@pytest.fixture
def clean_env(monkeypatch):
    for name in CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _argv(inputs: str, prefix: str, tokenizer: str, *extra: str) -> list[str]:
    return ["--input", inputs, "--output-prefix", prefix, "--tokenizer", tokenizer,
            "--seq-length", str(S), "--workers", "1", "--no-progress", *extra]


def _bucket_with_data(store, dataset) -> tuple[str, object]:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    fs = store.filesystem()
    fs.pipe({f"{bucket}/data/{name}": data for name, data in dataset.items()})
    return bucket, fs


def _credentials(store, how: str, monkeypatch, tmp_path) -> list[str]:
    """Point the build at the store by environment only, or by a YAML config only."""
    if how == "env":
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv(SECRET_ENV[store.protocol], SECRET)
        return []
    config = tmp_path / "storage.yaml"
    options = {**store.storage_options, "secret": SECRET}
    config.write_text(yaml.safe_dump({"source": {"storage_options": options}}))
    return ["--config", str(config)]


def _writes(store, bucket: str) -> list[tuple[str, str]]:
    """(method, object key) of every write or delete the OSS adapter received, in order."""
    out = []
    for method, path in store.request_log:
        key = unquote(path.split("?", 1)[0]).removeprefix(f"/{bucket}/")
        if method in ("PUT", "POST", "DELETE") and key.startswith("out/"):
            out.append((method, key.removeprefix("out/sft_text_document")))
    return out


def test_build_on_the_store_gives_the_local_bytes_and_shows_no_secret(
        store, dataset, local_build, qwen_dir, clean_env, tmp_path, capfd):
    credentials = CREDENTIALS[store.protocol]
    bucket, fs = _bucket_with_data(store, dataset)
    out = f"{bucket}/out/sft_text_document"
    fs.pipe({out + s: b"stale" for s in (".bin", ".idx", ".manifest.json", ".rejects.jsonl")})
    argv = _argv(f"{store.protocol}://{bucket}/data/", f"{store.protocol}://{bucket}/out/sft",
                 qwen_dir, "--overwrite", "--split-bytes", str(SPLIT),
                 *_credentials(store, credentials, clean_env, tmp_path))
    store.request_log.clear()

    cli.build(argv)

    assert fs.cat(out + ".bin") == local_build[".bin"]
    assert fs.cat(out + ".idx") == local_build[".idx"]
    assert not fs.exists(out + ".rejects.jsonl")  # the stale one is gone, none was written
    manifest_text = fs.cat(out + ".manifest.json").decode()
    manifest = json.loads(manifest_text)
    assert manifest["verified"] and manifest["summary"]["documents"] == LINES
    assert [(i["url"], i["read_tasks"]) for i in manifest["inputs"]] == [
        (f"{store.protocol}://{bucket}/data/{n}", tasks) for n, tasks in (
            ("a.jsonl", 6), ("b.parquet", 2), ("c.json.gz", 1), ("sub/d.jsonl", 5))]
    assert manifest["files"]["bin"] == f"{store.protocol}://{out}.bin"
    if credentials == "options":
        assert manifest["config"]["source"]["storage_options"]["secret"] == "***"
    captured = capfd.readouterr()
    assert "records read" in captured.out
    for text in (manifest_text, captured.out, captured.err):
        assert SECRET not in text

    if store.protocol == "s3":
        assert fs.info(out + ".bin")["ETag"].endswith('-2"')  # 2 parts streamed: 8 + 2.5 MiB
    else:
        writes = _writes(store, bucket)
        bin_parts = [m for m, k in writes if k == ".bin" and m == "PUT"]
        assert len(bin_parts) == 2, writes  # streamed as 2 parts
        completed = writes.index(("POST", ".bin"), writes.index(("POST", ".bin")) + 1)
        assert writes.index(("DELETE", ".idx")) < completed  # the old index goes first
        assert writes[-1] == ("PUT", ".manifest.json")
        assert completed < writes.index(("PUT", ".idx"))


def test_a_missing_output_bucket_fails_without_showing_the_secret(store, ray_session, qwen_dir,
                                                                  clean_env, tmp_path, capfd):
    """ossfs finds it in the driver's output check; s3fs only when the writer uploads."""
    bucket, fs = _bucket_with_data(store, {"a.jsonl": b'{"instruction": "hi", "output": "ho"}\n'})
    argv = _argv(f"{store.protocol}://{bucket}/data/a.jsonl",
                 f"{store.protocol}://no-such-bucket-{uuid.uuid4().hex[:8]}/out/sft", qwen_dir,
                 *_credentials(store, CREDENTIALS[store.protocol], clean_env, tmp_path))
    with pytest.raises(FileNotFoundError, match="bucket does not exist") as failure:
        cli.build(argv)
    captured = capfd.readouterr()
    for text in (str(failure.value), repr(failure.value), captured.out, captured.err):
        assert SECRET not in text
    if store.protocol == "s3":
        assert "upload to s3://no-such-bucket-" in str(failure.value)


def test_resolved_options_carry_the_environment_and_redact_hides_them(clean_env):
    clean_env.setenv("OSS_ACCESS_KEY_ID", "id")
    clean_env.setenv("OSS_ACCESS_KEY_SECRET", SECRET)
    clean_env.setenv("OSS_ENDPOINT", "https://oss-cn-hangzhou.aliyuncs.com")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    given = {"s3": {"key": "k", "secret": SECRET}}
    resolved = resolve_options(["oss://b/x.jsonl", "s3://c/out", "/local/y.jsonl"], given)
    assert resolved["oss"] == {"key": "id", "secret": SECRET,
                               "endpoint": "https://oss-cn-hangzhou.aliyuncs.com"}
    assert resolved["s3"] == {"key": "k", "secret": SECRET,
                              "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert "file" not in resolved and given == {"s3": {"key": "k", "secret": SECRET}}
    config = {"source": {"storage_options": resolved}, "template": {"tokenizer": "/m",
                                                                    "pad_token": "<pad>"}}
    shown = redact(config)
    assert SECRET not in json.dumps(shown)
    assert shown["template"] == config["template"]  # not secrets, though named like them
    assert shown["source"]["storage_options"]["oss"]["endpoint"].startswith("https://")


def test_shards_on_the_store_concatenate_to_the_local_bytes(dataset, local_build, qwen_dir,
                                                            clean_env, tmp_path):
    """Two spread writers stream their shards to S3; the driver writes the manifest last."""
    with s3_server() as store:
        bucket, fs = _bucket_with_data(store, dataset)
        argv = _argv(f"s3://{bucket}/data/", f"s3://{bucket}/out/sft", qwen_dir, "--shards",
                     "2", *_credentials(store, "options", clean_env, tmp_path))
        cli.build(argv)
        manifest = json.loads(fs.cat(f"{bucket}/out/sft_text_document.manifest.json"))
        prefixes = [f"s3://{bucket}/out/sft_{k}_text_document" for k in range(2)]
        assert [s["prefix"] for s in manifest["shards"]] == prefixes
        bins = [fs.cat(p.removeprefix("s3://") + ".bin") for p in prefixes]
        assert b"".join(bins) == local_build[".bin"]
        docs = [s["documents"] for s in manifest["shards"]]
        assert manifest["data_path"] == f"{docs[0]} {prefixes[0]} {docs[1]} {prefixes[1]}"
        assert sum(docs) == LINES and all(docs)
