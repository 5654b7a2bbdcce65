"""Which content format a chat template reads, decided once from its Jinja syntax tree (as vLLM does).

Two content formats exist in the wild (vLLM's `--chat-template-content-format`): "openai", where
`message['content']` is a list of typed parts and the template writes each image's placeholder itself,
and "string", a plain string. A template that iterates `message['content']` (a for loop,
`selectattr`/`map`/... filters, indexing like `content[0]['text']`) or tests its type (`is string`)
reads parts; any other reads a string.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

ContentFormat = Literal["string", "openai"]


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (assistant-token masks); parsed here to its
    body, which is all that format detection needs."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
)


def parse_template(template: str) -> jinja2.nodes.Template:
    """The template's syntax tree under the tags transformers' renderer knows (TemplateSyntaxError if bad)."""
    return _ENV.parse(template)


# Filters that only make sense on a list of parts.
_LIST_FILTERS = {"selectattr", "rejectattr", "map", "select", "reject", "groupby", "batch", "sort", "unique"}
# Type tests: a template that asks whether content is a string expects it may be a list of parts.
_TYPE_TESTS = {"string", "sequence", "iterable", "mapping"}


def _unwrap(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    """The expression under filters, tests and slices: `x | selectattr(...)`, `x is string`, `x[1:]` -> x."""
    while True:
        if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
            node = node.node
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
            node = node.node
        else:
            return node


def _is_name(node: jinja2.nodes.Node, names: set[str]) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name in names


def _aliases(root: jinja2.nodes.Template, names: set[str], matches) -> set[str]:
    """`names` plus every variable `{% set %}` to an expression `matches` accepts over the set so far
    (transitively: `{% set loop_messages = messages[1:] %}`, `{% set content = message['content'] %}`)."""
    names = set(names)
    assigns = [
        (a.target.name, a.node)
        for a in root.find_all(jinja2.nodes.Assign)
        if isinstance(a.target, jinja2.nodes.Name)
    ]
    grown = True
    while grown:  # to a fixed point: each pass may add names the next pass builds on
        grown = False
        for target, value in assigns:
            if target not in names and matches(_unwrap(value), names):
                names.add(target)
                grown = True
    return names


def _loop_targets(root: jinja2.nodes.Template, over) -> Iterator[str]:
    for loop in root.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and over(_unwrap(loop.iter)):
            yield loop.target.name


def _content_is_listlike(root: jinja2.nodes.Template) -> bool:
    messages = _aliases(root, {"messages"}, _is_name)
    message = set(_loop_targets(root, lambda it: _is_name(it, messages)))

    def is_message(node):  # a loop variable over the messages, or messages[0] / messages[-1]
        if _is_name(node, message):
            return True
        return (
            isinstance(node, jinja2.nodes.Getitem)
            and _is_name(_unwrap(node.node), messages)
            and isinstance(node.arg, (jinja2.nodes.Const, jinja2.nodes.Neg))
        )

    def is_content_access(node):
        if isinstance(node, jinja2.nodes.Getitem):
            return (
                isinstance(node.arg, jinja2.nodes.Const)
                and node.arg.value == "content"
                and is_message(node.node)
            )
        if isinstance(node, jinja2.nodes.Getattr):
            return node.attr == "content" and is_message(node.node)
        return False

    message = _aliases(root, message, lambda n, names: _is_name(n, names) or is_message(n))
    content_names = _aliases(root, set(), lambda n, names: is_content_access(n) or _is_name(n, names))

    def is_content(node):
        node = _unwrap(node)
        return is_content_access(node) or _is_name(node, content_names)

    if any(True for _ in _loop_targets(root, is_content)):
        return True
    for used in root.find_all(jinja2.nodes.Filter):
        if used.name in _LIST_FILTERS and used.node is not None and is_content(used.node):
            return True
    for test in root.find_all(jinja2.nodes.Test):
        if test.name in _TYPE_TESTS and is_content(test.node):
            return True
    for access in root.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
        # content[0]['text'] / content[0].text: a part of a list
        inner = access.node  # type: ignore[attr-defined]
        if (
            isinstance(inner, jinja2.nodes.Getitem)
            and isinstance(inner.arg, jinja2.nodes.Const)
            and isinstance(inner.arg.value, int)
            and is_content(inner.node)
        ):
            return True
    return False


def detect_content_format(template: str) -> ContentFormat:
    """The content format `template` reads: "openai" (a list of parts) or "string".
    A template that does not parse is "string" (rendering it reports the syntax error)."""
    try:
        root = parse_template(template)
    except jinja2.TemplateError:
        log.warning("the chat template does not parse; assuming it reads string content", exc_info=True)
        return "string"
    return "openai" if _content_is_listlike(root) else "string"
