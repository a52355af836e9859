"""Records: one raw input value becomes a group of conversations, or a ``RecordError``.

A line holds one sample (a JSON object) or a pre-packed group (a JSON list of objects that must
share one packed sequence). Every sample becomes a ``Conversation``: a list of chat messages
(``role`` in system/user/assistant/tool, ``content`` a string, assistant ``tool_calls``) and
optional tool schemas, the shape Hugging Face chat templates take. Accepted formats, detected per
object unless ``format`` forces one:

- alpaca: ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``;
  the user turn is ``instruction + input`` (plain concatenation, as the reference does).
- messages (OpenAI): ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?}``; content a
  string or a list of text parts ``{"type": "text", "text" | "value": ...}``.
- sharegpt: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}`` with roles
  human/gpt/system/function_call/observation.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from sftprep.errors import Error

FORMATS = ("alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool",
                   "tool": "tool"}


class RecordError(Error, ValueError):
    """A record that cannot be used. ``reason`` is a short category, ``detail`` says what and how
    to fix it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Conversation:
    messages: list[dict]
    tools: list | None = None

    @property
    def chars(self) -> int:
        """Characters of all message contents (the reference's statistic for Alpaca)."""
        return sum(len(m["content"]) for m in self.messages)


def parse_group(text: bytes, format: str = "auto", columns: dict | None = None) -> list[Conversation]:
    """Parse one raw record (a line or an array element) into the conversations it holds."""
    value = _loads(text)
    if isinstance(value, dict):
        return [parse_sample(value, format, columns)]
    if isinstance(value, list):
        if not value:
            raise RecordError("empty group", "a list line must hold at least one sample object")
        bad = [i for i, v in enumerate(value) if not isinstance(v, dict)]
        if bad:
            raise RecordError("not a sample", f"element {bad[0]} of the list line is a "
                              f"{type(value[bad[0]]).__name__}, expected an object")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(parse_sample(v, format, columns))
            except RecordError as e:
                raise RecordError(e.reason, f"element {i} of the list line: {e.detail}") from None
        return out
    raise RecordError("not a sample", f"a JSON {type(value).__name__}; expected an object or a "
                      "list of objects")


def _loads(text: bytes):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as u:
            raise RecordError("not UTF-8", f"byte {u.start} is not valid UTF-8; re-encode the "
                              "file as UTF-8") from None
        msg = str(e)
        if "unexpected end of data" in msg or "EOF" in msg:
            raise RecordError("truncated JSON", f"{msg}; the record ends before its JSON "
                              "value is complete") from None
        raise RecordError("invalid JSON", msg) from None


def parse_sample(obj: dict, format: str = "auto", columns: dict | None = None) -> Conversation:
    if columns:
        obj = {columns.get(k, k): v for k, v in obj.items()}
    if format == "auto":
        format = detect_format(obj)
    if format == "alpaca":
        return _alpaca(obj)
    if format == "messages":
        return _messages(obj)
    if format == "sharegpt":
        return _sharegpt(obj)
    raise ValueError(f"unknown format {format!r}")


def detect_format(obj: dict) -> str:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    keys = ", ".join(sorted(obj)[:8]) or "none"
    raise RecordError("unknown format", f"keys {keys}; expected instruction/input/output "
                      "(alpaca), messages, or conversations (sharegpt); map other names with "
                      "source.columns")


def _string(obj: dict, key: str, where: str = "", required: bool = True, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise RecordError("missing field", f"{where}{key!r} is missing or null")
        return default
    if not isinstance(value, str):
        raise RecordError("not a string", f"{where}{key!r} is a {type(value).__name__}, "
                          "expected a string")
    return value


def _alpaca(obj: dict) -> Conversation:
    messages = []
    system = _string(obj, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("bad history", "'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError("bad history", f"history[{i}] must be a [user, assistant] pair "
                              "of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = _string(obj, "instruction") + _string(obj, "input", required=False)
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": _string(obj, "output")}]
    return Conversation(messages)


def _tools(obj: dict) -> list | None:
    tools = obj.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = orjson.loads(tools)
        except orjson.JSONDecodeError:
            raise RecordError("bad tools", "'tools' is a string that is not JSON") from None
    if not isinstance(tools, list):
        raise RecordError("bad tools", "'tools' must be a list of tool schemas")
    return tools


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if not isinstance(text, str) or part.get("type", "text") != "text":
                raise RecordError("bad content", f"{where}: only text parts are supported")
            parts.append(text)
        return "".join(parts)
    raise RecordError("not a string", f"{where}: content is a {type(value).__name__}")


def _check_turns(messages: list[dict], where: str) -> None:
    if not messages:
        raise RecordError("empty conversation", f"{where} holds no message")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant turn", f"{where} has no assistant message to train on")


def _messages(obj: dict) -> Conversation:
    raw = obj.get("messages")
    if not isinstance(raw, list):
        raise RecordError("bad messages", "'messages' must be a list of {role, content}")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RecordError("bad messages", f"{where} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError("bad role", f"{where}: role {role!r}, expected one of {ROLES}")
        msg = {"role": role, "content": _content(m.get("content") or "", where)}
        if m.get("tool_calls"):
            msg["tool_calls"] = [_tool_call(c, where) for c in m["tool_calls"]]
        for key in ("name", "tool_call_id", "reasoning_content"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        messages.append(msg)
    _check_turns(messages, "'messages'")
    return Conversation(messages, _tools(obj))


def _tool_call(call, where: str) -> dict:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RecordError("bad tool call", f"{where}: a tool call needs a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            pass  # keep the string; templates render it as given
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def _sharegpt(obj: dict) -> Conversation:
    raw = obj.get("conversations")
    if not isinstance(raw, list):
        raise RecordError("bad conversations", "'conversations' must be a list of {from, value}")
    messages = []
    system = _string(obj, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
            raise RecordError("bad role", f"{where}: 'from' must be one of "
                              f"{', '.join(_SHAREGPT_ROLES)}")
        value = _string(turn, "value", f"{where} ")
        if turn["from"] == "function_call":
            try:
                call = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise RecordError("bad tool call", f"{where}: function_call value is not JSON") from None
            calls = call if isinstance(call, list) else [call]
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [_tool_call(c, where) for c in calls]})
        else:
            messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": value})
    _check_turns(messages, "'conversations'")
    return Conversation(messages, _tools(obj))
