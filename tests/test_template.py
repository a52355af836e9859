"""Loss spans from rendered prefixes, including templates whose earlier turns render differently."""

from __future__ import annotations

import pytest

from sftprep.records import Conversation
from sftprep.template import REFERENCE_CHATML, ChatRenderer, TemplateError, load_tokenizer

U1, A1, U2 = "First question?", "<think>\nreasoning one\n</think>\n\nFirst answer.", "Second?"
A2 = "<think>\nreasoning two\n</think>\n\nSecond answer."


def conv(*pairs, tools=None) -> Conversation:
    return Conversation([{"role": r, "content": c} for r, c in pairs], tools)


def spans(renderer, c) -> list[str]:
    out = renderer(c)
    return [out.text[a:b] for a, b in out.trained]


def test_single_turn_span_is_everything_after_the_prompt(qwen):
    r = ChatRenderer(qwen)
    c = conv(("user", "Hi"), ("assistant", "Hello"))
    out = r(c)
    prompt = qwen.apply_chat_template(c.messages[:1], tokenize=False)
    assert out.trained == [(len(prompt), len(out.text))]


def test_qwen3_template_strips_earlier_reasoning_without_mislabeling(qwen):
    c = conv(("system", "Be kind."), ("user", U1), ("assistant", A1), ("user", U2),
             ("assistant", A2))
    got = spans(ChatRenderer(qwen), c)
    # The earlier turn is rendered without its <think> block in the full text, so its span is
    # exactly that rendering; the last turn keeps its reasoning.
    assert got == ["<|im_start|>assistant\nFirst answer.<|im_end|>\n",
                   "<|im_start|>assistant\n<think>\nreasoning two\n</think>\n\n"
                   "Second answer.<|im_end|>\n"]


def test_prefix_stable_template_and_options(qwen_dir, tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(REFERENCE_CHATML)
    tok = load_tokenizer(qwen_dir, chat_template=str(path))
    c = Conversation([{"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "", "tool_calls": [{"x": 1}]},
                      {"role": "tool", "content": "r"},
                      {"role": "assistant", "content": "a2"},
                      {"role": "user", "content": "q2"}, {"role": "user", "content": "q3"},
                      {"role": "assistant", "content": "a3"}])
    turn = "<|im_start|>assistant\n{}<|im_end|>\n".format
    assert spans(ChatRenderer(tok), c) == [turn(""), turn("a2"), turn("a3")]
    assert spans(ChatRenderer(tok, train_on="last"), c) == [turn("a3")]
    assert spans(ChatRenderer(tok, train_tool_calls=False), c) == [turn("a2"), turn("a3")]
    assert ChatRenderer(tok)(c).text.startswith("<|im_start|>system\nYou are a helpful")


def test_template_that_never_agrees_again_is_an_error(qwen_dir, tmp_path):
    path = tmp_path / "weird.jinja"
    path.write_text("{% for m in messages %}{% if loop.last %}{{ m.content | upper }}"
                    "{% else %}{{ m.content }}{% endif %}|{% endfor %}")
    tok = load_tokenizer(qwen_dir, chat_template=str(path))
    c = conv(("user", "abc"), ("assistant", "def"), ("user", "ghi"), ("assistant", "jkl"))
    with pytest.raises(TemplateError, match="differently in context"):
        ChatRenderer(tok)(c)


def test_pad_token_rules(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 151669
    tok = load_tokenizer(qwen_dir, "<|extra_0|>")
    assert tok.pad_token_id == 151669 and len(tok) == 151670


THINKING_TEMPLATE = (  # reads the reasoning under the name gpt-oss templates use
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{% if m.thinking %}[{{ m.thinking }}]"
    "{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}{{ c | tojson }}{% endfor %}"
    "</{{ m.role }}>{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
)


def demo_conversations() -> list[Conversation]:
    from sftprep.demo import ALPACA, CHAT
    from sftprep.records import parse_group

    out = []
    for path in (ALPACA, CHAT):
        with open(path, "rb") as f:
            out += [c for line in f for c in parse_group(line)]
    reasoning = {"role": "assistant", "content": "It is 4.", "reasoning_content": "2+2=4"}
    out.append(Conversation([{"role": "user", "content": "2+2?"}, reasoning]))
    return out


@pytest.mark.parametrize("template", ["tokenizer's own", "reference ChatML", "thinking"])
def test_render_is_exactly_apply_chat_template(qwen_dir, tmp_path, template):
    """ChatRenderer renders through its own compiled copy of the template (see ``_compile``);
    every prefix of every demo conversation must come out as apply_chat_template's text."""
    path = tmp_path / "t.jinja"
    path.write_text({"reference ChatML": REFERENCE_CHATML, "thinking": THINKING_TEMPLATE}
                    .get(template, ""))
    tok = load_tokenizer(qwen_dir, "<|extra_0|>",
                         str(path) if template != "tokenizer's own" else None)
    renderer, convs = ChatRenderer(tok), demo_conversations()
    assert sum(bool(c.tools) for c in convs) >= 3
    assert any(m.get("tool_calls") for c in convs for m in c.messages)
    for c in convs:
        # transformers 5 passes a message's reasoning under both names, 4.x as given: the
        # rendering must not depend on the version, so 4.x is given both names too
        messages = [{"thinking": m["reasoning_content"], **m} if m.get("reasoning_content")
                    else m for m in c.messages]
        for k in range(1, len(c.messages) + 1):
            expected = tok.apply_chat_template(messages[:k], tools=c.tools, tokenize=False)
            assert renderer.render(c.messages[:k], c.tools) == expected
    if template == "thinking":
        assert "[2+2=4]It is 4." in renderer.render(convs[-1].messages)


@pytest.mark.parametrize("body", ["{{ messages.__class__.__mro__ }}",
                                  "{% set _ = messages.append(1) %}{{ messages }}",
                                  "{{ messages[0].update({'role': 'x'}) }}"])
def test_the_sandbox_still_refuses_what_it_refused(qwen_dir, tmp_path, body):
    path = tmp_path / "evil.jinja"
    path.write_text(body)
    tok = load_tokenizer(qwen_dir, chat_template=str(path))
    c = conv(("user", "q"), ("assistant", "a"))
    with pytest.raises(Exception, match="(?i)unsafe|security|access"):
        tok.apply_chat_template(c.messages, tokenize=False)
    renderer = ChatRenderer(tok)
    for _ in range(2):  # the second time the verdict comes from the memo
        with pytest.raises(TemplateError, match="(?i)unsafe|security|access"):
            renderer.render(c.messages)


FEATURES_TEMPLATE = (  # what transformers' environment gives templates beyond plain Jinja
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'tool' %}{% continue %}"
    "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}[{{ m.role }}]{% endgeneration %}"
    "{{ m.content | tojson }}{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}"
    "{{ dict(a=ns.n) | tojson }}{% if messages | length > 99 %}{{ raise_exception('long') }}"
    "{% endif %}{{ strftime_now('%Y') | length }}"
)


def test_template_environment_matches_transformers(qwen_dir, tmp_path):
    """Our compile (jinja2's public API) has what transformers gives a template: the sandbox,
    tojson without HTML escapes, namespace, dict, loop controls, {% generation %},
    raise_exception, strftime_now, trim_blocks/lstrip_blocks."""
    path = tmp_path / "features.jinja"
    path.write_text(FEATURES_TEMPLATE + "\n  {% if true %}\n    x\n  {% endif %}\n")
    tok = load_tokenizer(qwen_dir, chat_template=str(path))
    msgs = [{"role": "user", "content": "<b>\"中文\" & 'q'</b>"},
            {"role": "tool", "content": "skipped"}, {"role": "assistant", "content": "a"}]
    assert ChatRenderer(tok).render(msgs) == tok.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(TemplateError, match="long"):
        ChatRenderer(tok).render(msgs * 40)
