"""Chat templating: the tokenizer as the reference sets it up, and where each turn's text lies.

The loss mask comes from rendered prefixes, never from re-tokenizing them: the conversation is
rendered once in full and tokenized once; each assistant turn ``i`` spans the characters from the
end of ``render(messages[:i])`` to the end of ``render(messages[:i+1])``, and those character
offsets are mapped to token positions of the full encoding. For a single turn this is exactly the
contract's rule: the prompt is ``render(conversation[:1])`` and everything after it is trained.

Some templates render a message differently when it is the last one (the Qwen3 template adds an
empty ``<think>`` block to the final assistant turn and strips reasoning from earlier ones), so a
prefix render is not always a prefix of the full text. Then the boundary is found where the two
agree again: after the longest tail of the prefix render that continues the full text at the
point they diverged. If no such point exists the conversation is rejected rather than mislabeled.

Reasoning (``reasoning_content``, ``<think>`` blocks in assistant content) is counted by the same
renders: a text is kept when its turn's rendered text holds it. Templates that keep reasoning only
after the last user message (Qwen3) leave the earlier turns' out, as at inference; with
``reasoning_turns: split`` such a turn becomes its own sample (the conversation up to it, as the
template renders history, and the turn itself trained, rendered as the last one). Decided by
rendering, so any template works.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

from sftprep import sandbox
from sftprep.config import ConfigError, given, option
from sftprep.errors import Error
from sftprep.records import Conversation

# The reference's ChatML template, used when the tokenizer has none and none is given.
REFERENCE_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(Error, ValueError):
    """The chat template cannot place this conversation's loss mask (or failed to render it)."""


def load_tokenizer(path: str, pad_token: str | None = None, chat_template: str | None = None):
    """Load a Hugging Face tokenizer offline and set its pad token and chat template.

    ``pad_token`` is added as a special token when given (the reference adds ``<|extra_0|>``;
    on a vocabulary without it the new id is ``len(tokenizer)``); otherwise the tokenizer's pad
    token is kept, else its eos token is used. ``chat_template`` is a file path.
    """
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, JSON and key errors here
        raise ConfigError(_unloadable(path, e)) from None
    if not getattr(tok, "is_fast", False):  # transformers 4.x falls back to a Python tokenizer
        raise ConfigError(f"{given('template.tokenizer', path, path)}: transformers loaded "
                          f"only a slow (Python) {type(tok).__name__}; sftprep encodes with the "
                          "fast one: give a directory with tokenizer.json, or install "
                          "sentencepiece (or tiktoken) so transformers can convert this one")
    if pad_token:
        tok.add_special_tokens({"pad_token": pad_token})
    elif tok.pad_token is None:
        if tok.eos_token is None:
            raise TemplateError(f"tokenizer {path} has neither a pad nor an eos token; "
                                f"give {option('template.pad_token', 'TOKEN')}")
        tok.pad_token = tok.eos_token
    if chat_template:
        with open(chat_template, encoding="utf-8") as f:
            tok.chat_template = f.read()
    elif not tok.chat_template:
        tok.chat_template = REFERENCE_CHATML
    return tok


def _unloadable(path: str, e: Exception) -> str:
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    has = (f"it holds {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names
           else "it is empty")
    why = (str(e).strip().splitlines() or [""])[0].rstrip(" :")
    return (f"{given('template.tokenizer', path, path)}: no Hugging Face tokenizer loads from "
            f"this directory ({has}; "
            f"one needs tokenizer.json or the vocabulary files its tokenizer_config.json names): "
            f"{type(e).__name__}: {why}")


@dataclass
class Rendered:
    """A sample's full text and the character spans whose tokens are trained."""

    text: str
    trained: list[tuple[int, int]]
    chars: int  # of the conversation's message contents, for the statistics
    # Reasoning texts this sample accounts for: (carried, not in its rendered turn, split off
    # into this sample as its own); () when it carries none.
    reasoning: tuple = ()


class ChatRenderer:
    """Renders conversations and finds the character span of every trained assistant turn."""

    def __init__(self, tokenizer, train_on: str = "all", train_tool_calls: bool = True,
                 traced: bool = True, reasoning_turns: str = "keep"):
        """``traced``: render through ``trace.TracedTemplate`` (the same text, faster), else
        always through Jinja (the reference ``--tokenizer-backend hf`` keeps).
        ``reasoning_turns``: keep (the template's rendering) or split (``samples``)."""
        self.train_on = train_on
        self.train_tool_calls = train_tool_calls
        self.reasoning_turns = reasoning_turns
        self._template = _compile(tokenizer.chat_template)
        self._context = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes
        self.traced = None
        if traced:
            from sftprep.trace import TracedTemplate
            self.traced = TracedTemplate(tokenizer.chat_template, self._context, self._jinja)

    def render(self, messages: list[dict], tools: list | None = None, traced: bool = True) -> str:
        """What ``apply_chat_template(messages, tools=tools, tokenize=False)`` returns.

        Without its per-call deep copy and normalizing of every message: ``records`` builds them
        from plain JSON values, so that work changes nothing here (``test_template`` checks the
        two agree), and rendering is the stage's largest cost after encoding (a fifth of it with
        the HF encoder, about half with the fast path). ``traced=False``: through Jinja even
        when traces are on (the stage's guard).
        """
        messages = [_with_reasoning_aliases(m) for m in messages]
        return (self.traced if traced and self.traced else self._jinja)(messages, tools)

    def _jinja(self, messages: list[dict], tools: list | None) -> str:
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=False, **self._context)
        except Exception as e:  # jinja2 raises many kinds; all mean "this input does not render"
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def __call__(self, conv: Conversation, traced: bool = True) -> Rendered:
        """The conversation as one sample, as the template renders it."""
        return self._samples(conv, traced, split=False)[0]

    def samples(self, conv: Conversation, traced: bool = True) -> list[Rendered]:
        """The samples a conversation becomes: one, or with ``reasoning_turns: split`` first
        one per trained assistant turn whose reasoning the full rendering leaves out (the
        conversation up to that turn, only that turn trained), then the full conversation
        training the other turns (left out when none is left)."""
        return self._samples(conv, traced, split=self.reasoning_turns == "split")

    def _samples(self, conv: Conversation, traced: bool, split: bool) -> list[Rendered]:
        msgs = conv.messages
        r = _Renders(self, conv, traced)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.train_on == "last":
            turns = turns[-1:]
        if not self.train_tool_calls:
            turns = [i for i in turns if not msgs[i].get("tool_calls")]
        spans = {i: r.span(i) for i in turns}
        # Decided by rendering: a reasoning text is kept if its turn's rendered text holds it.
        texts = {i: t for i, m in enumerate(msgs) if (t := reasoning_texts(m))}
        missing = {i: _missing(t, r.turn_text(i)) for i, t in texts.items()}
        alone = []  # (turn, its own sample)
        for i in turns if split else ():
            if missing.get(i):
                start, text = r.alone(i)
                left = _missing(texts[i], text[start:])
                if left < missing[i]:
                    alone.append((i, Rendered(text, [(start, len(text))],
                                              Conversation(msgs[:i + 1]).chars,
                                              (len(texts[i]), left, 1))))
        done = {i for i, _ in alone}
        rest = [i for i in texts if i not in done]
        counts = (sum(len(texts[i]) for i in rest), sum(missing[i] for i in rest), 0)
        samples = [s for _, s in alone]
        trained = [spans[i] for i in turns if i not in done]
        if samples and not trained:  # every trained turn has its own sample
            last = samples[-1]
            last.reasoning = tuple(a + b for a, b in zip(last.reasoning, counts))
            return samples
        return samples + [Rendered(r.full, trained, conv.chars, counts if rest else ())]

    @staticmethod
    def _boundary(full: str, prefix: str, k: int) -> int:
        """Where the rendering of the first ``k`` messages ends inside ``full``."""
        if full.startswith(prefix):
            return len(prefix)
        lcp = _common_prefix(full, prefix)
        tail = prefix[lcp:]
        for j in range(len(tail)):  # longest tail of the prefix render that continues ``full``
            if full.startswith(tail[j:], lcp):
                return lcp + len(tail) - j
        raise TemplateError(f"the chat template renders message {k - 1} differently in context "
                            "and the two renderings never agree again; the loss mask cannot be "
                            "placed (give a --chat-template whose turns render independently)")


class _Renders:
    """One conversation's renders: the full text, and each prefix's when asked (once)."""

    def __init__(self, renderer: ChatRenderer, conv: Conversation, traced: bool):
        self.renderer, self.conv, self.traced = renderer, conv, traced
        n = len(conv.messages)
        self.full = renderer.render(conv.messages, conv.tools, traced)
        self.texts = {n: self.full}
        self.bounds = {0: 0, n: len(self.full)}

    def text(self, k: int) -> str:
        """The rendering of the first ``k`` messages."""
        if k not in self.texts:
            self.texts[k] = self.renderer.render(self.conv.messages[:k], self.conv.tools,
                                                 self.traced)
        return self.texts[k]

    def bound(self, k: int) -> int:
        """Where the first ``k`` messages end inside the full text."""
        if k not in self.bounds:
            self.bounds[k] = ChatRenderer._boundary(self.full, self.text(k), k)
        return self.bounds[k]

    def span(self, i: int) -> tuple[int, int]:
        """Message ``i``'s characters in the full text."""
        a, b = self.bound(i), self.bound(i + 1)
        if b < a:
            raise TemplateError(f"turn {i} ends before it starts in the rendered text")
        return a, b

    def turn_text(self, i: int) -> str:
        """Message ``i`` as the full text renders it (the whole text where a turn the loss mask
        does not need cannot be placed)."""
        try:
            a, b = self.span(i)
        except TemplateError:
            return self.full
        return self.full[a:b]

    def alone(self, i: int) -> tuple[int, str]:
        """The conversation up to message ``i`` rendered on its own, and where message ``i``
        starts in it."""
        text = self.text(i + 1)
        return (ChatRenderer._boundary(text, self.text(i), i) if i else 0), text


_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def reasoning_texts(message: dict) -> list[str]:
    """The reasoning an assistant message carries: its ``reasoning_content`` and every
    ``<think>...</think>`` block of its content, stripped (an empty one carries none)."""
    if message["role"] != "assistant":
        return []
    texts = [message.get("reasoning_content") or ""]
    if "<think>" in message["content"]:
        texts += _THINK.findall(message["content"])
    return [t.strip() for t in texts if t.strip()]


def _missing(texts: list[str], rendered: str) -> int:
    """How many of ``texts`` ``rendered`` does not hold (a text given twice must be there twice)."""
    return sum(max(0, n - rendered.count(t)) for t, n in Counter(texts).items())


def _compile(chat_template: str):
    """The template compiled in the sandbox ``apply_chat_template`` uses (``sandbox``)."""
    return sandbox.environment().from_string(chat_template)


def _with_reasoning_aliases(message: dict) -> dict:
    """``reasoning_content`` also as ``thinking``, which some templates (gpt-oss) read instead;
    apply_chat_template passes both names the same way."""
    if message.get("reasoning_content") is None:
        return message
    return {"thinking": message["reasoning_content"], **message}


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slices: fast in C, no Python loop over characters
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
