"""Multi-turn chat data end to end: every assistant turn trained, nothing else, on real files."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import needs_shared, shared_file
from sftprep.demo import CHAT
from sftprep.idxmap import IndexedReader
from sftprep.view import describe_document, sample_runs
from test_pipeline import build

PUBLIC_CHATS = ("glaive_toolcall_en_demo.json", "v1_sft_demo.jsonl")


def trained_runs(reader: IndexedReader, tok) -> list[str]:
    """The decoded text of every run of trained tokens in the file."""
    texts = []
    for k in range(len(reader)):
        ids, samples = sample_runs(np.asarray(reader.document(k)))
        texts += [tok.decode(ids[a:b].tolist()) for *_, runs in samples
                  for a, b, trained in runs if trained]
    return texts


@pytest.mark.parametrize("tool_calls", [True, False])
def test_chat_demo_trains_exactly_the_assistant_turns(ray_session, qwen_dir, qwen, tmp_path,
                                                      tool_calls):
    manifest = build([CHAT], qwen_dir, tmp_path / "chat", template__seq_length=2048,
                     packing__mode="bfd", run__workers=2, template__train_tool_calls=tool_calls)
    s = manifest["summary"]
    assert s["rejected_records"] == 0
    assert s["samples_written"] + s["dropped_samples"] == s["samples_in"]
    reader = IndexedReader(str(tmp_path / "chat_text_document"))
    runs = trained_runs(reader, qwen)
    assert all(r.startswith("<|im_start|>assistant\n") and r.endswith("<|im_end|>\n")
               for r in runs)
    assert not any("<|im_start|>user" in r or "<|im_start|>system" in r for r in runs)
    # the demo's tool-calling turns are trained, or none of them is
    assert any("<tool_call>" in r for r in runs) == tool_calls
    if tool_calls:
        assert s["dropped_samples"] == 0
        assert len(runs) > s["samples_written"]  # multi-turn: more trained turns than samples
        shown = describe_document(reader, 0, qwen, color=False)
        assert "trained in" in shown and "⟦<|im_start|>assistant" in shown


@needs_shared(*PUBLIC_CHATS)
def test_public_sharegpt_tool_calls_and_messages_files(ray_session, qwen_dir, qwen, tmp_path):
    manifest = build([shared_file(n) for n in PUBLIC_CHATS], qwen_dir, tmp_path / "pub", template__seq_length=4096,
                     packing__mode="bfd", run__workers=2, template__train_tool_calls=False)
    s = manifest["summary"]
    assert s["samples_in"] == 800 and s["rejected_records"] == 0
    # A chat whose only assistant turns call tools has nothing left to train on (or its first
    # trained turn starts beyond S).
    assert s["samples_written"] + s["dropped_samples"] == 800
    assert set(s["dropped_by_reason"]) <= {"nothing to train", "prompt too long"}
    runs = trained_runs(IndexedReader(str(tmp_path / "pub_text_document")), qwen)
    assert runs and all(r.startswith("<|im_start|>assistant\n") for r in runs)
    assert not any("<tool_call>" in r for r in runs)  # tool-calling turns are not trained
