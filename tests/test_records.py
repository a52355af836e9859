"""Record formats and the reasons bad records are rejected."""

from __future__ import annotations

import json

import pytest

from sftprep.records import RecordError, parse_group


def one(obj, **kw):
    [conv] = parse_group(json.dumps(obj, ensure_ascii=False).encode(), **kw)
    return conv


def test_alpaca_concatenates_instruction_and_input_and_keeps_history_and_system():
    conv = one({"instruction": "Translate:", "input": "你好", "output": "Hello",
                "system": "Be brief.", "history": [["Hi", "Hello!"]]})
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate:你好"}, {"role": "assistant", "content": "Hello"}]
    assert one({"instruction": "a", "input": None, "output": "b"}).messages[0]["content"] == "a"


def test_messages_with_text_parts_and_tool_calls():
    conv = one({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is "},
                                     {"type": "text", "value": "2+2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "calc", "arguments": '{"x": "2+2"}'}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4"}], "tools": [{"type": "function"}]})
    assert conv.messages[0]["content"] == "What is 2+2?"
    assert conv.messages[1]["tool_calls"][0]["function"] == {"name": "calc",
                                                             "arguments": {"x": "2+2"}}
    assert conv.tools == [{"type": "function"}]


def test_sharegpt_roles_system_and_function_calls():
    conv = one({"conversations": [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."}], "system": "sys", "tools": '[{"name": "w"}]'})
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool",
                                                  "assistant"]
    assert conv.messages[2]["tool_calls"][0]["function"]["name"] == "w"
    assert conv.tools == [{"name": "w"}]


def test_columns_map_other_names_and_format_can_be_forced():
    conv = one({"prompt": "p", "answer": "a"}, columns={"prompt": "instruction",
                                                        "answer": "output"})
    assert conv.messages[-1] == {"role": "assistant", "content": "a"}
    with pytest.raises(RecordError, match="missing field"):
        one({"messages": []}, format="alpaca")


def test_list_line_is_a_group():
    text = json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    assert len(parse_group(text.encode())) == 2


@pytest.mark.parametrize("raw,reason", [
    (b'{"instruction": "x", "output": "y"', "truncated JSON"),
    (b'{"instruction": x}', "invalid JSON"),
    (b'{"instruction": "caf\xe9", "output": "y"}', "not UTF-8"),
    (b'"just a string"', "not a sample"),
    (b'[1, 2]', "not a sample"),
    (b'[]', "empty group"),
    (b'{"instruction": "x"}', "missing field"),
    (b'{"instruction": "x", "output": 5}', "not a string"),
    (b'{"text": "x"}', "unknown format"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}', "bad role"),
    (b'{"conversations": [{"from": "alien", "value": "x"}]}', "bad role"),
    (b'[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "missing field"),
])
def test_bad_records_have_a_reason(raw, reason):
    with pytest.raises(RecordError) as e:
        parse_group(raw)
    assert e.value.reason == reason and e.value.detail
