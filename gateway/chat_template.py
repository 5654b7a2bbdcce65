"""Chat templates: where a checkpoint's template comes from, and rendering it in its content format.

Two content formats exist in the wild (gateway/template_format.py decides which a template reads):
- "openai": `message['content']` is a list of typed parts (`{"type": "image"}`, `{"type": "text", ...}`)
  and the template writes each image's placeholder itself (llava-hf's and Qwen2-VL's templates);
- "string": `message['content']` is a plain string (original llava-1.5 templates, many community
  ones); the gateway flattens each message's parts into text, writing the family's placeholder text
  for every image part.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from gateway.template_format import ContentFormat, detect_content_format, parse_template
from mmserve.errors import CheckpointError, InvalidInputError

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
