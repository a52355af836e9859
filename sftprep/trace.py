"""Traced chat-template rendering: Jinja's result, computed by straight-line Python per shape.

Why: after encoding, rendering is the tokenizer stage's largest cost (one full render and one
prefix render per turn boundary), and conversations of one shape take the same path through
the template again and again.

How (concolic tracing). The template is compiled a second time in an instrumented copy of the
sandbox and rendered once on a conversation whose string values (contents, names, tool-call
fields; not the roles, nor dict keys) are ``Proxy`` objects. A proxy is *not* a ``str``, so
Python and C code that needs a real string raises instead of silently using the value
(``x in 'literal'``, ``str()``, ``%``, ``hash``, iteration, dict lookups, a proxy as an index).
What a template may do with a proxy is a closed list, each done on the concrete value and
written down as one line of Python:

- a string result (``strip``, ``split(...)[i]``, slices, ``+``, ``~``, filters such as ``trim``
  or ``tojson``, ``'sep'.join(...)``, a macro's or block's captured output) is a new proxy, a
  *slot*;
- any other result (``==``, ``in``, truthiness, ``startswith``, ``length``, ``is string``, ...)
  is a *guard*: the trace holds only while it comes out as it did.

Filters and tests get concrete values (containers of the input by their path, so ``tojson`` of a
message is a slot too); the few that only walk containers (``length``, ``first``, ``selectattr``,
``map``, ...) see proxies. Anything else a proxy meets (an unknown method, autoescaping,
``random``) raises ``Untraceable``. Tool schemas and tool-call arguments, whose fields differ from
record to record, are ``Sealed``: only handed whole to a filter, else the template is traced with
their fields in the key. Output is the template's literal text and its slots; a trace replays as
``run(leaves, root)``, ``None`` where a guard fails.
A shape is traced when it is met the second time, and again for each new combination of guard
outcomes, up to ``MAX_TRACES``; the first render of each is Jinja's.

Why it is exact: the shape key holds everything of the input the template sees without a proxy
(roles, keys, value types, list lengths, numbers), and every observation of a string value is a
guard, so a conversation of that shape whose guards hold takes the traced path through the
template, and every slot is the same Python operation on the same values Jinja would apply.
Every new trace must reproduce Jinja's text for the conversation that made it; a shape whose
tracing fails or disagrees is rendered by Jinja from then on, so is anything beyond
``MAX_TRACES`` paths per shape, and any exception in a replay sends that conversation to Jinja
(which then raises or renders as it would have).
"""

from __future__ import annotations

import functools
import operator
import types

from jinja2 import Environment, Undefined
from jinja2.compiler import CodeGenerator
from jinja2.nodes import EvalContext
from markupsafe import Markup

from sftprep import sandbox

MAX_TRACES = 32      # guard outcomes kept per shape; beyond them that shape renders with Jinja
MAX_SHAPES = 20_000  # shapes remembered and traced; beyond them new shapes render with Jinja

# str methods a template may call on a proxy (no format/format_map: the sandbox rewrites those).
STR_METHODS = frozenset(
    "capitalize casefold center count endswith expandtabs find index isalnum isalpha isascii "
    "isdecimal isdigit isidentifier islower isnumeric isprintable isspace istitle isupper join "
    "ljust lower lstrip partition removeprefix removesuffix replace rfind rindex rjust "
    "rpartition rsplit rstrip split splitlines startswith strip swapcase title upper "
    "zfill".split())
# Filters that only walk containers or call proxies' own operations: they get containers of
# proxies as they are (a proxy itself is recorded). Every other filter and every test gets
# concrete values and is recorded.
STRUCTURAL_FILTERS = frozenset(
    "count length first last default d list items select reject selectattr rejectattr map "
    "reverse".split())
# Tests that look at the type of a value only: on a non-proxy they are the same on the input.
TYPE_TESTS = frozenset(
    "defined undefined none boolean false true integer float string mapping number sequence "
    "iterable callable".split())


class Untraceable(Exception):
    """The template did something with an input value that the tracer does not model."""


def _refuse(*_):
    raise Untraceable("a template used an input string in a way traces do not model")


class Proxy:
    """A string value of the input during tracing: its concrete value and how to recompute it
    (``src``, a Python expression over the replay's arguments)."""

    __slots__ = ("value", "src", "tracer")

    def __init__(self, value, src: str, tracer: "_Tracer"):
        self.value, self.src, self.tracer = value, src, tracer

    def _op(self, fn, *args):
        return self.tracer.apply(fn, (self, *args))

    def __eq__(self, other):
        return self._op(operator.eq, other)

    def __ne__(self, other):
        return self._op(operator.ne, other)

    def __lt__(self, other):
        return self._op(operator.lt, other)

    def __le__(self, other):
        return self._op(operator.le, other)

    def __gt__(self, other):
        return self._op(operator.gt, other)

    def __ge__(self, other):
        return self._op(operator.ge, other)

    def __contains__(self, item):
        return self._op(operator.contains, item)

    def __bool__(self):
        return self._op(bool)

    def __len__(self):
        return self._op(len)

    def __getitem__(self, key):
        return self._op(operator.getitem, key)

    def __add__(self, other):
        return self._op(operator.add, other)

    def __radd__(self, other):
        return self.tracer.apply(operator.add, (other, self))

    def __mul__(self, other):
        return self._op(operator.mul, other)

    __rmul__ = __mul__

    def __mod__(self, other):
        return self._op(operator.mod, other)

    __str__ = __repr__ = __format__ = __hash__ = __iter__ = __reversed__ = __index__ = _refuse


class Sealed:
    """A tool schema or a tool call's ``arguments`` object during tracing: not in the shape key
    (their fields vary from record to record), so a template may only hand one whole to a filter
    (``tojson``, as most do). Anything else on it is untraceable, and the template is traced
    with them in the key from then on."""

    __slots__ = ()
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __bool__ = __len__ = \
        __iter__ = __reversed__ = __contains__ = __getitem__ = __str__ = __repr__ = \
        __format__ = _refuse


class _Method:
    """``proxy.name`` as the sandbox hands it to a call."""

    __slots__ = ("proxy", "name")

    def __init__(self, proxy: Proxy, name: str):
        self.proxy, self.name = proxy, name

    def __call__(self, *args, **kwargs):
        return self.proxy.tracer.apply(_method(self.name), (self.proxy, *args), kwargs)


@functools.cache
def _method(name: str):
    def call(value, *args, **kwargs):
        return getattr(value, name)(*args, **kwargs)
    call.__name__ = name
    return call


def _str_join(*parts) -> str:
    """Jinja's ``~``: every operand as ``str``."""
    return "".join(map(str, parts))


def _join(*parts) -> str:
    """A captured block's text (``environment.concat``)."""
    return "".join(parts)


class _Tracer:
    """Records one render: Python lines computing slots and checking guards, and the
    constants they use."""

    def __init__(self):
        self.lines: list[str] = []
        self.consts: dict[str, object] = {}
        self.inputs: dict[int, tuple] = {}  # id of a proxied container: (original, its src)
        self.kept: list = []                # the proxied containers, alive while ids are used
        self.leaves = 0

    def const(self, value) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        return name

    def copy(self, messages: list, tools, seal: bool) -> tuple:
        """The input with its string values as proxies (in ``shape``'s order of leaves), and
        with ``seal`` its tool schemas and call arguments ``Sealed``."""
        self.seal = seal
        proxied = [self._copy_message(m, f"R[0][{i}]") for i, m in enumerate(messages)]
        self._keep(proxied, messages, "R[0]")
        if seal and type(tools) is list:
            return proxied, self._keep([self._sealed(t, f"R[1][{i}]") if type(t) is dict
                                        else self._copy(t, f"R[1][{i}]")
                                        for i, t in enumerate(tools)], tools, "R[1]")
        return proxied, self._copy(tools, "R[1]")

    def _copy_message(self, m, src: str):
        if type(m) is not dict:
            return self._copy(m, src)
        out = {k: v if k == "role" and type(v) is str else self._copy(v, f"{src}[{self.const(k)}]")
               for k, v in m.items()}
        return self._keep(out, m, src)

    def _copy(self, x, src: str):
        t = type(x)
        if t is str:
            self.leaves += 1
            return Proxy(x, f"L[{self.leaves - 1}]", self)
        if t is dict:
            return self._keep({k: self._sealed(v, f"{src}[{self.const(k)}]")
                               if self.seal and k == "arguments" and type(v) is dict
                               else self._copy(v, f"{src}[{self.const(k)}]")
                               for k, v in x.items()}, x, src)
        if t is list:
            return self._keep([self._copy(v, f"{src}[{i}]") for i, v in enumerate(x)], x, src)
        return x

    def _sealed(self, original, src: str) -> Sealed:
        return self._keep(Sealed(), original, src)

    def _keep(self, copy, original, src: str):
        self.inputs[id(copy)] = (original, src)
        self.kept.append(copy)
        return copy

    def plain(self, x) -> tuple:
        """``(concrete value, src)`` of a value passed to recorded code; src None: a constant."""
        t = type(x)
        if t is Proxy:
            return x.value, x.src
        if x is None or t in (int, float, bool, slice) or isinstance(x, _CONSTANT):
            return x, None
        known = self.inputs.get(id(x))
        if known is not None:
            return known
        if t is list or t is tuple:
            parts = [self.plain(v) for v in x]
            if all(src is None for _, src in parts):
                return x, None
            items = "".join(f"{src or self.const(v)}, " for v, src in parts)
            return t(v for v, _ in parts), f"[{items}]" if t is list else f"({items})"
        if t is dict:
            parts = [(k, *self.plain(v)) for k, v in x.items()]
            if all(src is None for *_, src in parts):
                return x, None
            return ({k: v for k, v, _ in parts},
                    "{" + "".join(f"{self.const(k)}: {src or self.const(v)}, "
                                  for k, v, src in parts) + "}")
        raise Untraceable(f"a {t.__name__} passed where input strings are recorded")

    def apply(self, fn, args, kwargs=None):
        """``fn(*args, **kwargs)`` on concrete values, written down; a slot or guarded result."""
        values, srcs = zip(*map(self.plain, args)) if args else ((), ())
        kw = {k: self.plain(v) for k, v in (kwargs or {}).items()}
        result = fn(*values, **{k: v for k, (v, _) in kw.items()})
        call = ", ".join([src or self.const(v) for v, src in zip(values, srcs)]
                         + [f"{k}={src or self.const(v)}" for k, (v, src) in kw.items()])
        return self.result(result, f"{self.const(fn)}({call})")

    def result(self, value, expr: str):
        var = f"v{len(self.lines)}"
        self.lines.append(f"{var} = {expr}")
        t = type(value)
        if t is str or t is Markup:
            return Proxy(value, var, self)
        if value is None or t is bool:
            self.lines.append(f"if {var} is not {value!r}: return None")
            return value
        if t is int or t is float:
            self.lines.append(f"if {var} != {self.const(value)} or type({var}) is not "
                              f"{self.const(t)}: return None")
            return value
        if (t is list or t is tuple) and all(type(v) is str for v in value):
            self.lines.append(f"if len({var}) != {len(value)}: return None")
            return t(Proxy(v, f"{var}[{i}]", self) for i, v in enumerate(value))
        raise Untraceable(f"a {t.__name__} computed from input strings")

    def output(self, value):
        """What ``{{ value }}`` writes: ``str(value)``, a slot for a proxy."""
        if type(value) is not Proxy:
            return str(value)
        return value if type(value.value) is str else self.apply(str, (value,))

    def concat(self, parts, fn=_join):
        """Captured text (``_join``) or ``~`` (``_str_join``): a slot if a proxy is in it."""
        if not any(type(p) is Proxy for p in parts):
            return fn(*parts)
        return self.apply(fn, parts)

    def compile(self, parts: list):
        """The replay function: this render's lines, then the output's literals and slots."""
        out, literal = [], []
        for p in parts:
            if type(p) is Proxy:
                if literal:
                    out.append(self.const("".join(literal)))
                    literal = []
                out.append(p.src)
            else:
                literal.append(p)
        if literal:
            out.append(self.const("".join(literal)))
        body = "".join(f"    {line}\n" for line in self.lines)
        source = f"def run(L, R):\n{body}    return ''.join(({', '.join(out)},))\n"
        namespace = dict(self.consts)
        exec(compile(source, "<chat template trace>", "exec"), namespace)
        return namespace["run"]


# Values passed to recorded code as they are (str includes Markup; the environment and eval
# context are those of every render).
_CONSTANT = (str, Undefined, Environment, EvalContext)


class _Codegen(CodeGenerator):
    """Output, ``~`` and captured text go through the tracer; autoescaping is not traced."""

    def _plain(self, frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape or self.environment.finalize:
            raise Untraceable("autoescaping or finalize")

    def _output_child_pre(self, node, frame, finalize) -> None:
        self._plain(frame)
        self.write("environment.tracer.output(")

    def _output_child_post(self, node, frame, finalize) -> None:
        self.write(")")

    def visit_Concat(self, node, frame) -> None:
        self._plain(frame)
        self.write("environment.tracer.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("), environment.str_join)")

    def visit_EvalContextModifier(self, node, frame) -> None:
        raise Untraceable("{% autoescape %}")

    visit_ScopedEvalContextModifier = visit_EvalContextModifier


def _instrumented(Sandbox):
    """The sandbox class with proxies routed through the tracer (``sandbox.environment``'s hook)."""

    class Tracing(Sandbox):
        code_generator_class = _Codegen
        tracer: _Tracer | None = None
        str_join = staticmethod(_str_join)

        def concat(self, parts):
            return self.tracer.concat(list(parts))

        def getattr(self, obj, attribute: str):
            if type(obj) is Sealed:
                raise Untraceable("a field of a sealed tool schema or arguments")
            if type(obj) is Proxy:
                if attribute not in STR_METHODS:
                    raise Untraceable(f"str attribute {attribute!r}")
                return _Method(obj, attribute)
            return super().getattr(obj, attribute)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- as the sandbox's
            """``'literal'.join(...)``, ``'literal'.startswith(x)``, ... with input values:
            recorded like a proxy's own methods."""
            owner = getattr(__obj, "__self__", None)
            if (type(owner) is str and type(__obj) is types.BuiltinMethodType
                    and __obj.__name__ in STR_METHODS
                    and any(__self.tracer.plain(a)[1] is not None for a in args)):
                kwargs = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
                return __self.tracer.apply(_method(__obj.__name__), (owner, *args), kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def getitem(self, obj, argument):
            if type(obj) is Sealed:
                raise Untraceable("a field of a sealed tool schema or arguments")
            if type(argument) is Proxy:
                raise Untraceable("an input string as an index or key")
            if type(obj) is Proxy:
                if type(argument) not in (int, slice):
                    raise Untraceable("a string indexed by a non-integer")
                try:
                    return obj[argument]
                except IndexError:  # Jinja makes that undefined; not traced
                    raise Untraceable("a string index out of range") from None
            return super().getitem(obj, argument)

    return Tracing


def _structural(env, fn, name: str):
    """A filter that walks containers: as it is, but recorded on a proxy itself."""
    lead = 1 if getattr(fn, "jinja_pass_arg", None) else 0
    pure = _pure(env, fn, name, False)

    @functools.wraps(fn)
    def structural(*args, **kwargs):
        return (pure if len(args) > lead and type(args[lead]) is Proxy else fn)(*args, **kwargs)

    return structural


def _pure(env, fn, name: str, test: bool):
    """A filter or test that gets concrete values and is recorded when they come from the input."""
    passed = getattr(fn, "jinja_pass_arg", None)  # environment, eval context or context first
    lead = 1 if passed else 0

    @functools.wraps(fn)
    def pure(*args, **kwargs):
        tracer = env.tracer
        if name == "join" and len(args) > lead and isinstance(args[lead], types.GeneratorType):
            args = (*args[:lead], list(args[lead]), *args[lead + 1:])
        if test and name in TYPE_TESTS and type(args[lead]) not in (Proxy, Sealed):
            return fn(*args, **kwargs)
        if all(tracer.plain(a)[1] is None for a in (*args[lead:], *kwargs.values())):
            return fn(*args, **kwargs)
        if passed is not None and passed.name == "context" or name == "sameas":
            raise Untraceable(f"{'test' if test else 'filter'} {name!r} on input strings")
        return tracer.apply(fn, args, kwargs)

    return pure


def _tracing_template(chat_template: str):
    """The template compiled in the instrumented sandbox, and that environment."""
    env = sandbox.environment(_instrumented)
    env.filters = {name: _structural(env, f, name) if name in STRUCTURAL_FILTERS
                   else _pure(env, f, name, False) for name, f in env.filters.items()}
    env.tests = {name: _pure(env, f, name, True) for name, f in env.tests.items()}
    strftime_now = env.globals["strftime_now"]
    env.globals["strftime_now"] = lambda fmt: env.tracer.apply(strftime_now, (fmt,))
    env.filters["random"] = env.globals["lipsum"] = _refuse
    return env, env.from_string(chat_template)


SEALED = "sealed"


def shape(messages: list, tools, leaves: list, seal: bool) -> tuple:
    """Everything of the input a template sees without a proxy (with ``seal``, not what is
    inside tool schemas and call arguments); its string values go to ``leaves`` in the order
    ``_Tracer.copy`` numbers them."""
    key = []
    for m in messages:
        if type(m) is not dict:
            key.append(_skeleton(m, leaves, seal))
            continue
        items = []
        for k, v in m.items():
            if type(v) is str:
                if k == "role":
                    items.append((k, v))
                else:
                    leaves.append(v)
                    items.append(k)
            else:
                items.append((k, _skeleton(v, leaves, seal)))
        key.append(tuple(items))
    if seal and type(tools) is list:
        return tuple(key), tuple(SEALED if type(t) is dict else _skeleton(t, leaves, seal)
                                 for t in tools)
    return tuple(key), _skeleton(tools, leaves, seal)


def _skeleton(x, leaves: list, seal: bool):
    t = type(x)
    if t is str:
        leaves.append(x)
        return str
    if t is dict:
        return (dict, *[(k, SEALED if seal and k == "arguments" and type(v) is dict
                         else _skeleton(v, leaves, seal)) for k, v in x.items()])
    if t is list:
        return (list, *[_skeleton(v, leaves, seal) for v in x])
    if x is None or t in (int, float, bool):
        return t, repr(x)
    raise Untraceable(f"a {t.__name__} in the input")


class TracedTemplate:
    """Renders like ``jinja(messages, tools)`` through traces of the template, else through it."""

    def __init__(self, chat_template: str, context: dict, jinja):
        self.context = context
        self.jinja = jinja
        self.traces: dict[tuple, list | None] = {}  # shape: replay functions, None for Jinja
        self.seen: set[tuple] = set()                # shapes met once, traced when met again
        self.rendered = self.fallbacks = 0           # renders, and those that Jinja made
        self.seal = True  # tool schemas and arguments out of the key, until a trace needs them
        try:
            self.env, self.template = _tracing_template(chat_template)
        except Exception:  # noqa: BLE001 -- whatever the tracer cannot compile, Jinja renders
            self.template = None

    def __call__(self, messages: list, tools) -> str:
        self.rendered += 1
        leaves, root = [], (messages, tools)
        key = self._shape(messages, tools, leaves)
        for run in self.traces.get(key) or ():
            try:
                text = run(leaves, root)
            except Exception:  # noqa: BLE001 -- a replay that fails proves nothing; Jinja decides
                text = None
            if text is not None:
                return text
        self.fallbacks += 1
        text = self.jinja(messages, tools)  # raises what Jinja raises
        if key is not None:
            self._learn(key, messages, tools, leaves, text)
        return text

    def _shape(self, messages: list, tools, leaves: list) -> tuple | None:
        if self.template is None:
            return None
        try:
            return shape(messages, tools, leaves, self.seal)
        except Untraceable:
            return None

    def _learn(self, key: tuple, messages: list, tools, leaves: list, text: str) -> None:
        """Trace a shape met before whose traces did not hold; keep the trace if it gives
        Jinja's ``text``, else leave the shape to Jinja (or first stop sealing)."""
        traces = self.traces.get(key)
        if traces is None:
            if key in self.traces or len(self.traces) >= MAX_SHAPES:
                return
            if key not in self.seen:
                if len(self.seen) >= MAX_SHAPES:
                    self.seen.clear()
                self.seen.add(key)
                return
            traces = self.traces[key] = []
        if len(traces) >= MAX_TRACES:
            self.traces[key] = None
            return
        run = self._trace(messages, tools)
        try:
            same = run is not None and run(leaves, (messages, tools)) == text
        except Exception:  # noqa: BLE001
            same = False
        if same:
            traces.append(run)
        elif self.seal:  # perhaps the template reads inside tools or arguments: key them
            self.seal = False
            self.traces.clear()
            self.seen.clear()
        else:
            self.traces[key] = None

    def _trace(self, messages: list, tools):
        tracer = _Tracer()
        self.env.tracer = tracer
        try:
            proxied, proxied_tools = tracer.copy(messages, tools, self.seal)
            parts = list(self.template.generate(messages=proxied, tools=proxied_tools,
                                                documents=None, add_generation_prompt=False,
                                                **self.context))
            return tracer.compile(parts)
        except Exception:  # noqa: BLE001 -- untraceable, or a proxy met code that needs a str
            return None
        finally:
            self.env.tracer = None
