"""Chat templates: where a checkpoint's template comes from, which content format it expects, rendering.

Two content formats exist in the wild (vLLM's `--chat-template-content-format`):
- "openai": `message['content']` is a list of typed parts (`{"type": "image"}`, `{"type": "text", ...}`)
  and the template writes each image's placeholder itself (llava-hf's and Qwen2-VL's templates);
- "string": `message['content']` is a plain string (original llava-1.5 templates, many community
  ones); the gateway flattens each message's parts into text, writing the family's placeholder text
  for every image part.

The format is decided once per template from its Jinja syntax tree, as vLLM does: a template that
iterates `message['content']` (a for loop, `selectattr`/`map`/... filters, indexing like
`content[0]['text']`) or tests its type (`is string`) reads parts; any other reads a string.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mmserve.errors import CheckpointError, InvalidInputError

log = logging.getLogger(__name__)

ContentFormat = Literal["string", "openai"]

# apply_chat_template's own parameters and the variables we set: a request's chat_template_kwargs may
# not override them (vLLM refuses the same collisions).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "conversation",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
    }
)

NO_TEMPLATE_MESSAGE = (
    "this model has no chat template, so /v1/chat/completions cannot render messages: start the gateway "
    "with --chat-template (or CHAT_TEMPLATE) set to a Jinja template file or text, or send a raw prompt "
    "with image tags to /v1/completions"
)


# ---- loading ---------------------------------------------------------------------------------------


def _template_field(value, where: str) -> str | None:
    """A `chat_template` value: a string, or transformers' list of named templates (the default one)."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        return value.get("default") or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or None
    raise CheckpointError(f"{where}: chat_template is neither text nor a list of named templates")


def read_template_override(override: str) -> str:
    """`--chat-template`: a file (a .jinja/.txt template, or a .json holding `chat_template`), else the
    template text itself (used verbatim). Text without any Jinja delimiter that names no file is an error:
    it is most likely a mistyped path."""
    path = Path(override).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a long inline template is not a valid path on every OS
        is_file = False
    if is_file:
        text = path.read_text()
        if path.suffix == ".json":
            try:
                found = _template_field(json.loads(text).get("chat_template"), str(path))
            except (ValueError, AttributeError) as exc:
                raise CheckpointError(
                    f"chat template file {path}: not a JSON object with chat_template"
                ) from exc
            if not found:
                raise CheckpointError(f"chat template file {path}: no chat_template in it")
            return found
        return text
    if "{{" in override or "{%" in override:
        return override
    raise CheckpointError(
        f"chat template {override!r} is neither an existing file nor Jinja template text ({{{{ ... }}}} / {{% ... %}})"
    )


def load_chat_template(checkpoint: str, tokenizer, override: str | None = None) -> str | None:
    """The chat template to render chats with: `override` (a file path or inline Jinja text), else the
    tokenizer's, else the checkpoint's `chat_template.jinja`, else its `chat_template.json` (llava-hf
    keeps the template at processor level). None when there is none."""
    if override:
        template = read_template_override(override)
        try:
            parse_template(template)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"chat template override: line {exc.lineno}: {exc.message}") from exc
        return template
    own = _template_field(getattr(tokenizer, "chat_template", None), "tokenizer")
    if own:
        return own
    folder = Path(checkpoint)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text() or None
    if (folder / "chat_template.json").is_file():
        where = str(folder / "chat_template.json")
        return _template_field(
            json.loads((folder / "chat_template.json").read_text()).get("chat_template"), where
        )
    return None


# ---- content format detection ---------------------------------------------------------------------


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


def _is_key(node: jinja2.nodes.Node, names: set[str], key: str) -> bool:
    """`name['key']` or `name.key` for a name in `names`."""
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _is_name(node.node, names) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
        )
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_name(node.node, names) and node.attr == key
    return False


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


# ---- rendering ------------------------------------------------------------------------------------


def flatten_content(parts: list[dict], image_text: str, images_first: bool, text_separator: str) -> str:
    """A message's parts as one string for a "string" template: `image_text` for every image part,
    all images ahead of the text (`images_first`, LLaVA's convention) or where each image part was."""
    texts = [p["text"] for p in parts if p.get("type") == "text"]
    if images_first:
        return image_text * (len(parts) - len(texts)) + text_separator.join(texts)
    out: list[str] = []
    after_text = False
    for part in parts:
        if part.get("type") == "text":
            out.append(text_separator + part["text"] if after_text else part["text"])
            after_text = True
        else:
            out.append(image_text)
            after_text = False
    return "".join(out)


class ChatTemplate:
    """A chat template with its detected content format, rendered through transformers."""

    def __init__(self, template: str, image_text: str, images_first: bool, text_separator: str):
        self.template = template
        self.content_format: ContentFormat = detect_content_format(template)
        self.image_text, self.images_first, self.text_separator = image_text, images_first, text_separator

    def messages_for_template(self, messages: list[dict]) -> list[dict]:
        """Messages in transformers' multimodal format ({"type": "image"} parts) as this template reads them."""
        if self.content_format == "openai":
            return messages
        return [
            {
                **m,
                "content": m["content"]
                if m.get("content") is None or isinstance(m["content"], str)
                else flatten_content(m["content"], self.image_text, self.images_first, self.text_separator),
            }
            for m in messages
        ]

    def render(self, tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> str:
        kwargs = dict(template_kwargs or {})
        clash = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if clash:
            raise InvalidInputError(f"chat_template_kwargs may not set {', '.join(clash)}")
        try:
            text = tokenizer.apply_chat_template(
                self.messages_for_template(messages),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
                **kwargs,
            )
        except (
            jinja2.TemplateError,  # undefined names, raise_exception(...) in the template, syntax errors
            TypeError,  # e.g. a template adding text to content of the other format
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
        ) as exc:
            raise InvalidInputError(
                f"the chat template cannot render these messages ({type(exc).__name__}: {exc}); "
                f"it was given {self.content_format} content"
            ) from None
        return str(text)
