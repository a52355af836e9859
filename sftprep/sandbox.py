"""The Jinja sandbox chat templates render in: the one ``apply_chat_template`` uses.

Its own module because two others build on it: ``template`` renders in it, and ``trace``
instruments a subclass of it (``environment(subclass)``).
"""

from __future__ import annotations

import json
from datetime import datetime


def environment(subclass=None):
    """The sandbox ``apply_chat_template`` uses, on jinja2's public API.

    The same environment transformers (4.x and 5.x) builds: ``ImmutableSandboxedEnvironment``
    with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension and a
    ``{% generation %}`` tag (which only marks text), a ``tojson`` that does not escape HTML,
    ``raise_exception``, ``strftime_now``, and 5.x's ``dict``/``namespace`` that refuse
    underscore names. ``test_template`` checks the texts equal ``apply_chat_template``'s.

    The sandbox decides whether a template may read an attribute from the object's type and the
    attribute's name alone, but decides again on every read (``loop.first``, ``content.strip``,
    ...); asked once per ``(type, name)`` it allows and refuses exactly what it did before, and
    rendering takes half the time.

    ``subclass`` makes the class to instantiate from this sandbox class (``trace`` instruments
    it), so both share every setting above.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    dict_attributes = frozenset(dir(dict))

    class Sandbox(ImmutableSandboxedEnvironment):
        def getattr(self, obj, attribute: str):
            """``message.role`` on a plain dict: the sandbox tries ``getattr`` first and gets
            there through an AttributeError; a dict has no other attributes than its class's,
            so any other name is an item (or undefined), as the sandbox would find."""
            if type(obj) is dict and attribute not in dict_attributes:
                try:
                    return obj[attribute]
                except (TypeError, LookupError):
                    return self.undefined(obj=obj, name=attribute)
            return super().getattr(obj, attribute)

        def is_safe_attribute(self, obj, attr: str, value) -> bool:
            key = (type(obj), attr)
            verdict = self.verdicts.get(key)
            if verdict is None:
                verdict = self.verdicts[key] = super().is_safe_attribute(obj, attr, value)
            return verdict

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r})")

    env = (subclass(Sandbox) if subclass else Sandbox)(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.verdicts = {}
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env
