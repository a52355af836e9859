"""Built outputs through our model of Pai-Megatron-Patch's batch path (tests/trainer_model.py):
every document in both trainer modes, the trainer-safe cuts, verify's trainer rules on planted
bad rows, the reference rows that packed training cannot read."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from contract import _ids
from fixtures import SHARED_DATA, alpaca_samples, lines_with_groups, write_jsonl
from test_pipeline import REFERENCE_CONF, build
from trainer_model import TrainerError, get_batch, samples_of, trains_right
from sftprep import trainer
from sftprep.__main__ import main as cli
from sftprep.idxmap import IndexedReader
from sftprep.report import summary_text
from sftprep.tokenize import (CUT_ID_0, CUT_KEYS, CUT_PAD_SLOT, CUT_TRUNCATED, Tokenize,
                              TokenizeSpec)
from test_tokenize import batch

S = 128
SHARED = SHARED_DATA
ALPACA_EN = os.path.join(SHARED, "alpaca_en_demo.json")
CHAT_FILES = [os.path.join(SHARED, n) for n in ("glaive_toolcall_en_demo.json",
                                                "v1_sft_demo.jsonl")]


@pytest.fixture(scope="module")
def lines():
    """Short and long Alpaca samples (many cut at S=128), list lines, and outputs of "x!"
    repeated so that some cuts land on "!" (id 0 in Qwen's vocabulary), at either parity."""
    samples = alpaca_samples(40, seed=3)
    bangs = [{"instruction": "Say x!" + " please" * k, "input": "", "output": "x!" * 200}
             for k in range(4)]
    out = lines_with_groups(samples)
    out[2:2] = bangs
    return out


@pytest.fixture(scope="module")
def built(ray_session, qwen_dir, tmp_path_factory, lines):
    """``built(mode)``: the manifest and prefix of the trainer-safe build of ``lines`` (cached)."""
    tmp = tmp_path_factory.mktemp("built")
    path = write_jsonl(tmp / "train.jsonl", lines)
    cache = {}

    def get(packing: str) -> tuple[dict, str]:
        if packing not in cache:
            manifest = build([path], qwen_dir, tmp / packing, template__seq_length=S,
                             template__pad_token="<|extra_0|>", packing__mode=packing,
                             packing__window=16)
            cache[packing] = manifest, str(tmp / packing)
        return cache[packing]
    return get


def documents(prefix) -> list[np.ndarray]:
    reader = IndexedReader(str(prefix) + "_text_document")
    return [np.array(reader.document(k)) for k in range(len(reader))]


def model_verdict(docs, S) -> dict:
    """Per mode, the first document our model of the trainer refuses (None: all train right)."""
    out = {}
    for mode, packed in (("packed", True), ("unpacked", False)):
        out[mode] = None
        for k, doc in enumerate(docs):
            try:
                trains_right(doc, S, packed)
            except TrainerError:
                out[mode] = k
                break
    return out


def reports(prefix) -> list[dict]:
    path = f"{prefix}_text_document.rejects.jsonl"
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f]


@pytest.mark.parametrize("packing", ["none", "sequential", "bfd"])
def test_every_document_trains_right_in_packed_mode(built, packing, qwen, lines):
    rendered_tokens = sum(len(_ids(qwen, [
        {"role": "user", "content": x["instruction"] + x["input"]},
        {"role": "assistant", "content": x["output"]}]))
        for line in lines for x in (line if isinstance(line, list) else [line]))
    manifest, prefix = built(packing)
    docs = documents(prefix)
    s, t = manifest["summary"], manifest["trainer"]
    assert s["truncated_samples"] > 0 and s["trainer_safe"]
    for doc in docs:
        trains_right(doc, S, packed=True)
    multi = [k for k, d in enumerate(docs) if len(samples_of(d, S)) > 1]
    assert t["packed_documents"] == len(multi) > 0  # list lines are packed even with "none"
    assert model_verdict(docs, S) == {"packed": None, "unpacked": multi[0]}
    assert t["safe_modes"] == ["packed"] and t["problems"]["unpacked"].startswith(
        f"document {multi[0]}:")
    assert t["train_with"]["MP_SFT_PACKING"] == "true" and t["train_with"]["BATCH_SIZE"] == 1
    assert "--reset-position-ids" in t["train_with"]["flags"]
    if packing == "none":  # a document per dict line: one sample, safe unpacked too
        singles = [d for d in docs if len(samples_of(d, S)) == 1]
        for doc in singles:
            trains_right(doc, S, packed=False)
        get_batch(singles[:4], S, packed=False)  # several rows a micro-batch: fine unpacked
    # Every cut is counted and listed with the tokens it lost to each cut; the totals add up.
    cuts = [r for r in reports(prefix) if r["status"] == "cut"]
    assert len(cuts) == s["cut_samples"] >= s["truncated_samples"] > 0
    for name, key in CUT_KEYS.items():
        mine = [r["lost"][name] for r in cuts if name in r["lost"]]
        assert (len(mine), sum(mine)) == (s[f"{key}_samples"], s[f"{key}_tokens_lost"])
        assert all(name in r["reason"] for r in cuts if name in r["lost"])
    assert s["id_0_samples"] > 0 and s["pad_slot_samples"] == s["pad_slot_tokens_lost"]
    for r in cuts:  # reaching S costs the pad slot; only what is beyond S is truncated
        assert sum(r["lost"].values()) == r["tokens"] - r["kept"]
        assert r["lost"].get(CUT_TRUNCATED, 0) == max(0, r["tokens"] - S)
        assert r["lost"].get(CUT_PAD_SLOT, 0) == (r["tokens"] >= S)
    assert s["tokens_lost"] == sum(s[f"{key}_tokens_lost"] for key in CUT_KEYS.values())
    assert s["tokens"] == rendered_tokens - s["tokens_lost"]  # nothing dropped here
    text = summary_text(manifest)
    assert (f"truncated at S      {s['truncated_samples']} samples lost "
            f"{s['truncated_tokens_lost']:,} tokens") in text
    assert f"tokens lost         {s['tokens_lost']:,} in {len(cuts)} cut samples (" in text
    assert cli(["verify", prefix + "_text_document", "--trainer-mode", "packed"]) == 0


def test_reference_rows_crash_packed_training_and_verify_names_the_row(
        ray_session, qwen_dir, tmp_path, lines, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    manifest = build([path], qwen_dir, tmp_path / "ref", config=REFERENCE_CONF,
                     template__seq_length=S)
    docs = documents(tmp_path / "ref")
    first_bad = model_verdict(docs, S)["packed"]
    assert first_bad is not None
    with pytest.raises(TrainerError):
        trains_right(docs[first_bad], S, packed=True)
    t = manifest["trainer"]
    assert "packed" not in t["safe_modes"]
    assert t["problems"]["packed"].startswith(f"document {first_bad}:")
    assert t["rows_breaking"]["full_rows"] > 0 and t["rows_breaking"]["erased_boundaries"] > 0
    assert not manifest["summary"]["trainer_safe"]
    prefix = str(tmp_path / "ref_text_document")
    assert cli(["verify", prefix, "--trainer-mode", "packed"]) == 1
    assert f"document {first_bad}:" in capsys.readouterr().err
    # List lines are packed in both modes, so no mode is safe: plain verify fails too.
    assert cli(["verify", prefix]) == 1


@pytest.fixture(scope="module")
def good_output(built):
    return built("bfd")[1] + "_text_document"


def planted(good: str, tmp_path, k: int, row: np.ndarray) -> str:
    """A copy of ``good`` whose document ``k`` is ``row``."""
    prefix = str(tmp_path / "bad_text_document")
    for suffix in (".bin", ".idx", ".manifest.json"):
        shutil.copy(good + suffix, prefix + suffix)
    data = np.memmap(prefix + ".bin", dtype=np.int32, mode="r+")
    data[k * 2 * S:(k + 1) * 2 * S] = row
    data.flush()
    return prefix


def doc(*samples) -> np.ndarray:
    """A document of samples ``(length, last_id, trained_from)``, the layout's rules kept."""
    row = np.full(2 * S, -100, dtype=np.int32)
    row[:S] = 151669  # the pad <|extra_0|>
    at = 0
    for length, last_id, trained_from in samples:
        ids = np.arange(100 + at, 100 + at + length, dtype=np.int32)
        ids[-1] = last_id
        row[at:at + length] = ids
        row[S + at + trained_from - 1:S + at + length - 1] = ids[trained_from:]
        row[at + length - 1] = -1 - last_id
        at += length
    return row


@pytest.mark.parametrize("row", [
    doc((S, 198, 5)),                  # one sample fills the row: packed get_batch fails
    doc((50, 0, 5)),                   # ends on id 0: stored -1, GPTDataset makes it 0
    doc((30, 198, 30), (50, 198, 5)),  # a sample with no trained label: the loss average asserts
], ids=["full row", "-1 boundary", "untrained sample"])
def test_verify_catches_planted_rows_the_trainer_cannot_read(good_output, tmp_path, capsys, row):
    k = 3
    bad = planted(good_output, tmp_path, k, row)
    with pytest.raises(TrainerError):
        trains_right(np.asarray(IndexedReader(bad).document(k)), S, packed=True)
    assert cli(["verify", bad, "--trainer-mode", "packed"]) == 1
    err = capsys.readouterr().err
    assert f"document {k}:" in err, err
    assert cli(["verify", bad]) == 1  # bfd output: packed rows, so no other mode is safe
    assert cli(["verify", good_output, "--trainer-mode", "packed"]) == 0


def test_trainer_rules_in_the_stage(qwen_dir):
    safe = Tokenize(TokenizeSpec.of(qwen_dir, S, pad_token="<|extra_0|>"))
    ref = Tokenize(TokenizeSpec.of(qwen_dir, S, pad_token="<|extra_0|>", trainer_safe=False))
    base = {"instruction": "Say", "input": "", "output": ""}
    n0 = len(ref(batch([base])).to_pylist()[0]["input_ids"])
    exact = dict(base, output=" a" * (S - n0))  # exactly S tokens: whole for the reference
    [r, s] = [stage(batch([exact])).to_pylist()[0] for stage in (ref, safe)]
    assert len(r["input_ids"]) == S and r["reason"] is None
    assert len(s["input_ids"]) == S - 1 and s["reason"] == CUT_PAD_SLOT
    assert s["input_ids"][:-1] == r["input_ids"][:S - 2]
    assert s["input_ids"][-1] == -1 - r["input_ids"][S - 2] and s["tokens"] == S
    # Cuts inside "x!x!...": the token before the cut is "!" (id 0) at one parity.
    bangs = [dict(base, instruction="Say" + " please" * k, output="x!" * 200) for k in range(4)]
    refs, safes = ref(batch(bangs)).to_pylist(), safe(batch(bangs)).to_pylist()
    assert any(r["input_ids"][-1] == -1 for r in refs)  # the reference ends some on id 0
    for r, s in zip(refs, safes):
        ends_on_0 = r["input_ids"][S - 2] == 0
        assert len(s["input_ids"]) == (S - 2 if ends_on_0 else S - 1)
        assert s["input_ids"][-1] != -1 and (CUT_ID_0 in s["reason"]) == ends_on_0
    assert any(CUT_ID_0 in s["reason"] for s in safes)


@pytest.mark.skipif(not os.path.exists(ALPACA_EN), reason=f"no {ALPACA_EN} (shared demo data; "
                    "set SFTPREP_SHARED_DATA)")
@pytest.mark.parametrize("packing", ["none", "bfd"])
def test_alpaca_demo_at_256_trains_right(ray_session, qwen_dir, tmp_path, packing):
    manifest = build([ALPACA_EN], qwen_dir, tmp_path / "en", template__seq_length=256,
                     packing__mode=packing)
    docs = documents(tmp_path / "en")
    for doc in docs:
        trains_right(doc, 256, packed=True)
    s, t = manifest["summary"], manifest["trainer"]
    assert s["truncated_samples"] > 0 and s["pad_slot_samples"] >= s["truncated_samples"]
    assert "packed" in t["safe_modes"] and t["rows_breaking"]["full_rows"] == 0
    assert t["rows_breaking"]["erased_boundaries"] == 0
    if packing == "none":
        for doc in docs:
            trains_right(doc, 256, packed=False)
        assert t["safe_modes"] == ["packed", "unpacked"]


@pytest.mark.skipif(not all(map(os.path.exists, CHAT_FILES)),
                    reason=f"no chat demo files in {SHARED} (set SFTPREP_SHARED_DATA)")
def test_chat_demo_at_1024_trains_right(ray_session, qwen_dir, tmp_path):
    manifest = build(CHAT_FILES, qwen_dir, tmp_path / "chat", template__seq_length=1024,
                     packing__mode="bfd")
    for doc in documents(tmp_path / "chat"):
        trains_right(doc, 1024, packed=True)
    s, t = manifest["summary"], manifest["trainer"]
    assert s["truncated_samples"] > 0 and s["pad_slot_samples"] >= s["truncated_samples"]
    assert t["safe_modes"] == ["packed"] and t["rows_breaking"]["full_rows"] == 0


def test_verdict_names_the_first_document_per_mode():
    t = trainer.figures()
    rows = np.stack([doc((S, 198, 5)), doc((40, 198, 5))])
    trainer.check_rows(7, rows, S, t)
    v = trainer.verdict(t)
    assert v["packed"].startswith("document 7:") and v["unpacked"] is None
    assert trainer.section(t, S, "p")["train_with"]["MP_SFT_PACKING"] == "false"
    assert trainer.modes_text(t) == ("safe for MP_SFT_PACKING=false; not MP_SFT_PACKING=true "
                                     "(micro-batch size 1): " + v["packed"])
    t = trainer.figures()
    trainer.check_rows(0, rows[1:], S, t)
    assert trainer.modes_text(t) == ("safe for MP_SFT_PACKING=true (micro-batch size 1) and "
                                     "MP_SFT_PACKING=false")
    assert "any micro-batch size" in trainer.line(t, S, "p")


def test_a_trainer_safe_writer_refuses_a_row_packed_training_cannot_read(tmp_path):
    """The writer checks the packed trainer's rules on every document too (trainer_safe)."""
    from test_writer import end, sample, table
    from sftprep.writer import SFTWriter
    ids, trained = sample(32, 1)  # fills all 32 inputs alone
    rows = table([{"file": 0, "line": 1, "input_ids": ids, "trained": trained}, end(0, 1)])
    for safe in (False, True):
        w = SFTWriter(str(tmp_path / f"{safe}_text_document"), ["x.jsonl"], 32, 1000,
                      trainer_safe=safe)
        w.consume(rows)
        if safe:
            with pytest.raises(RuntimeError, match="document 0: its only sample fills"):
                w.finish({})
            w.abort()
            assert not os.path.exists(w.files.prefix + ".bin")
        else:
            t = w.finish({})["trainer"]
            assert t["rows_breaking"]["full_rows"] == 1 and t["safe_modes"] == ["unpacked"]


def test_trainer_figures_match_a_per_document_count_on_mixed_blocks():
    """One-sample rows take a shortcut in ``check_rows``; the figures must equal counting each
    document alone, sample by sample, on blocks mixing one-sample and packed rows, good and bad."""
    rng = np.random.default_rng(3)
    rows, expected = [], trainer.figures()
    for k in range(300):
        samples, at = [], 0
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.integers(2, 60))
            if at + length > S:
                break
            trained_from = int(rng.integers(1, length + 1))  # length: nothing trained
            last = int(rng.choice([0, 198, 42]))
            samples.append((length, last, trained_from))
            at += length
        row = doc(*samples)
        rows.append(row)
        one = trainer.figures()
        trainer.check_rows(0, row[None, :], S, one)  # a block of one row: its own figures
        trained_per = [tf < n for n, _, tf in samples]
        assert one["untrained_samples"] == (not all(trained_per))
        assert one["packed_documents"] == (len(samples) > 1)
        assert one["erased_boundaries"] == any(last == 0 for _, last, _ in samples)
        expected = trainer.combine([expected, one])
    got = trainer.figures()
    for start in range(0, len(rows), 64):
        trainer.check_rows(start, np.stack(rows[start:start + 64]), S, got)
    assert got == expected
    assert 0 < got["untrained_samples"] < got["documents"] and got["packed_documents"]


def test_train_iters_count_documents_epochs_and_global_batch(ray_session, qwen_dir, tmp_path,
                                                            monkeypatch, lines):
    """With SFT=true Pai's script takes TRAIN_ITERS as iterations of GLOBAL_BATCH_SIZE documents
    (docs/trainer.md): ceil(documents * epochs / GBS). A relative output prefix reaches the
    trainer absolute (its scripts start in their own directory), for shards too."""
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    manifest = build([path], qwen_dir, os.path.join("out", "rel"), template__seq_length=S,
                     trainer__epochs=3, trainer__global_batch_size=7, output__shards=2)
    documents = sum(len(IndexedReader(os.path.join("out", f"rel_{k}_text_document")))
                    for k in range(2))
    expected = -(-documents * 3 // 7)
    t = manifest["trainer"]
    assert t["iterations"]["TRAIN_ITERS"] == t["train_with"]["TRAIN_ITERS"] == expected
    warmup = t["train_with"]["LR_WARMUP_ITERS"]
    assert 0 <= 2 * warmup < expected and warmup == t["iterations"]["LR_WARMUP_ITERS"]
    assert t["train_with"]["GLOBAL_BATCH_SIZE"] == 7
    assert f"--train-iters {expected}" in t["train_with"]["flags"]
    assert f"--lr-decay-iters {expected - warmup}" in t["train_with"]["flags"]
    weights_and_paths = manifest["data_path"].split()
    assert t["train_with"]["DATASET_PATH"] == manifest["data_path"]
    for path in weights_and_paths[1::2]:
        assert os.path.isabs(path) and os.path.exists(path + ".bin")
    from sftprep.report import summary_text
    assert f"TRAIN_ITERS {expected:,}, warm-up {warmup:,} (3 epochs of {documents:,} " \
           "documents at GLOBAL_BATCH_SIZE 7" in summary_text(manifest)


def test_train_iters_defaults_and_the_unsharded_data_path(built):
    manifest, prefix = built("none")
    documents = len(IndexedReader(prefix + "_text_document"))
    t = manifest["trainer"]
    assert t["iterations"]["TRAIN_ITERS"] == -(-documents // trainer.GLOBAL_BATCH_SIZE)
    assert t["iterations"]["epochs"] == trainer.EPOCHS == 1
    assert manifest["data_path"] == t["train_with"]["DATASET_PATH"] == os.path.abspath(
        prefix + "_text_document")


@pytest.mark.parametrize("documents, epochs, gbs, train, warmup", [
    (80_000, 1, 8, 10_000, 100),  # Pai's SFT example: 10,000 iterations, 100 of warm-up
    (9, 1, 8, 2, 0),              # the last, partial batch counts: ceil
    (1, 1, 8, 1, 0),              # warm-up must stay below the decay (Megatron asserts it)
    (5, 2, 2, 5, 1),
    (0, 1, 8, 0, 0),
])
def test_iterations(documents, epochs, gbs, train, warmup):
    it = trainer.iterations(documents, epochs, gbs)
    assert (it["TRAIN_ITERS"], it["LR_WARMUP_ITERS"]) == (train, warmup)
    assert it["LR_DECAY_ITERS"] == train - warmup
