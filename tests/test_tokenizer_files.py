"""--tokenizer as a local directory, an object-store directory (loopback OSS and S3 servers) or a
hub id (a Hugging Face cache prepared here, offline): the same files, the same output bytes, the
manifest saying where they came from, and one clear line when they cannot be had."""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid

import pytest

from fixtures import alpaca_samples, write_jsonl
from object_store import oss_server, s3_server
from test_pipeline import build, read
from sftprep import tokenizer_files
from sftprep.__main__ import main as cli
from sftprep.config import ConfigError

SERVERS = {"oss": oss_server, "s3": s3_server}
REPO = "Qwen/Qwen-sftprep-test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = "model.safetensors"  # beside the tokenizer files everywhere: never fetched


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own caches, and no hub switch or credentials from the machine; never the network."""
    monkeypatch.setenv("SFTPREP_CACHE", str(tmp_path / "sftprep-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    for name in ("USE_MODELSCOPE_HUB", "HF_ENDPOINT", "OSS_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def _tokenizer_files(qwen_dir) -> dict[str, bytes]:
    files = {n: open(os.path.join(qwen_dir, n), "rb").read() for n in os.listdir(qwen_dir)}
    return {**files, WEIGHTS: b"\0" * 1024}


@pytest.fixture
def hf_cache(qwen_dir, tmp_path, monkeypatch) -> str:
    """A Hugging Face cache holding REPO at COMMIT as the hub's client lays it out."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in _tokenizer_files(qwen_dir).items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return str(cache)


@pytest.fixture(scope="module", params=sorted(SERVERS))
def store(request):
    with SERVERS[request.param]() as store:
        yield store


def _upload(store, qwen_dir) -> str:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    store.filesystem().pipe({f"{bucket}/models/qwen/{n}": data
                             for n, data in _tokenizer_files(qwen_dir).items()})
    return f"{store.protocol}://{bucket}/models/qwen"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", alpaca_samples(24, seed=5))


@pytest.fixture(scope="module")
def local_build(ray_session, qwen_dir, data, tmp_path_factory) -> tuple[dict, tuple]:
    prefix = tmp_path_factory.mktemp("local") / "out"
    manifest = build([data], qwen_dir, prefix, packing__mode="bfd")
    return manifest, read(prefix)


def test_an_object_store_directory_gives_the_local_bytes(store, qwen_dir, data, local_build,
                                                         tmp_path):
    url = _upload(store, qwen_dir)
    manifest = build([data], url + "/", tmp_path / "out", packing__mode="bfd",
                     source__storage_options=store.storage_options)
    assert read(tmp_path / "out") == local_build[1]
    local, got = local_build[0]["tokenizer"], manifest["tokenizer"]
    assert got["files"] == local["files"] and got["sha256"] == local["sha256"]
    assert WEIGHTS not in got["files"] and sorted(got["files"]) == sorted(os.listdir(qwen_dir))
    source = got["source"]
    assert source["kind"] == "store" and source["url"] == url + "/"
    assert sorted(source["etags"]) == sorted(got["files"]) and all(source["etags"].values())
    assert not os.path.exists(os.path.join(source["local_dir"], WEIGHTS))


def test_a_store_copy_is_reused_until_an_object_changes(store, qwen_dir):
    url = _upload(store, qwen_dir)
    first = tokenizer_files.resolve(url, store.storage_options)
    marker = os.path.join(first.path, "untouched")
    open(marker, "w").close()
    assert tokenizer_files.resolve(url, store.storage_options).path == first.path
    assert os.path.exists(marker)  # the same copy, not fetched again
    store.filesystem().pipe(url.split("://")[1] + "/added_tokens.json", b"{}")
    again = tokenizer_files.resolve(url, store.storage_options)
    assert again.files["added_tokens.json"] != first.files.get("added_tokens.json")
    assert not os.path.exists(marker)


def test_a_store_directory_without_tokenizer_files_is_one_line(store):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    store.filesystem().pipe(f"{bucket}/ckpt/{WEIGHTS}", b"\0")
    url = f"{store.protocol}://{bucket}/ckpt"
    with pytest.raises(ConfigError, match=f"--tokenizer {url}: no tokenizer files there "
                                          f"\\(it holds {WEIGHTS}\\)"):
        tokenizer_files.resolve(url, store.storage_options)


def test_a_hub_id_from_the_offline_cache_gives_the_local_bytes(hf_cache, qwen_dir, data,
                                                               local_build, tmp_path):
    manifest = build([data], REPO, tmp_path / "out", packing__mode="bfd")
    assert read(tmp_path / "out") == local_build[1]
    got = manifest["tokenizer"]
    assert got["path"] == REPO and got["sha256"] == local_build[0]["tokenizer"]["sha256"]
    assert {k: got["source"][k] for k in ("kind", "hub", "id", "revision", "commit")} == {
        "kind": "hub", "hub": "huggingface", "id": REPO, "revision": "main", "commit": COMMIT}
    assert tokenizer_files.pinned(got) == f"{REPO}@{COMMIT}"
    # verify and inspect find the same tokenizer from the manifest, still offline
    prefix = str(tmp_path / "out_text_document")
    assert cli(["verify", prefix]) == 0
    assert cli(["inspect", prefix, "--no-color"]) == 0


def test_a_hub_revision_after_at(hf_cache, qwen_dir):
    resolved = tokenizer_files.resolve(f"{REPO}@{COMMIT}")
    assert resolved.path.endswith(COMMIT) and resolved.source["revision"] == COMMIT
    assert resolved.files == tokenizer_files.file_hashes(qwen_dir)


def test_offline_without_the_files_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        tokenizer_files.resolve("Qwen/Not-Cached@v1")
    message = str(e.value)
    assert "\n" not in message and message.startswith("--tokenizer Qwen/Not-Cached@v1: "
                                                      "HF_HUB_OFFLINE=1 is set")
    assert "Qwen/Not-Cached@v1" in message and str(tmp_path / "hf-empty") in message


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None,
                    reason="modelscope is installed: there is no error to show")
def test_modelscope_without_its_package_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    with pytest.raises(ConfigError, match="USE_MODELSCOPE_HUB=1 asks for ModelScope, but the "
                                          "modelscope package is not installed: pip install "
                                          "modelscope"):
        tokenizer_files.resolve(REPO)


@pytest.mark.parametrize("value, kind", [("oss://bkt/qwen", "store"), ("s3://bkt/qwen", "store"),
                                         ("Qwen/Qwen3-8B", "hub"), ("Qwen/Qwen3-8B@v1.0", "hub")])
def test_one_place_decides_the_kind(value, kind):
    assert tokenizer_files.kind(value) == kind


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(qwen_dir, tmp_path,
                                                               monkeypatch):
    shutil.copytree(qwen_dir, tmp_path / "Qwen" / "Qwen3-8B")
    monkeypatch.chdir(tmp_path)
    assert tokenizer_files.kind("Qwen/Qwen3-8B") == "local"
    resolved = tokenizer_files.resolve("Qwen/Qwen3-8B")
    assert os.path.samefile(resolved.path, tmp_path / "Qwen" / "Qwen3-8B")
    assert resolved.source == {"kind": "local"}


@pytest.mark.parametrize("value", ["/nonexistent", "./relative/dir", "a/b/c", "file.json"])
def test_neither_directory_url_nor_hub_id_is_one_line(value):
    with pytest.raises(ConfigError, match=f"--tokenizer {value!r} is not a directory, nor an "
                                          "object-store URL"):
        tokenizer_files.check(value)
