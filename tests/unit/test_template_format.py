"""Chat template content formats, decided from the Jinja syntax tree: every real template of the
reference configs, string and parts templates written the ways found in the wild."""

from __future__ import annotations

import json

import pytest

from gateway.template_format import detect_content_format
from tests.checkpoints.hub import REFERENCE_DIR
from tools.checkpoints import LLAVA_CHAT_TEMPLATE

REFERENCE = REFERENCE_DIR

# The original llava-1.5 style: content rendered as a plain string.
STRING_LLAVA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def reference_templates() -> list[tuple[str, str]]:
    """(name, template) of every chat template in the reference configs (none where they are absent)."""
    found = []
    for path in sorted(REFERENCE.glob("*/chat_template.jinja")):
        found.append((f"{path.parent.name}/{path.name}", path.read_text()))
    for pattern in ("*/chat_template.json", "*/tokenizer_config*.json"):
        for path in sorted(REFERENCE.glob(pattern)):
            template = json.loads(path.read_text()).get("chat_template")
            if template:
                found.append((f"{path.parent.name}/{path.name}", template))
    return found


def test_the_reference_folders_hold_the_templates_we_mean_to_check():
    names = [name for name, _ in reference_templates()]
    assert "llava-hf__llava-1.5-7b-hf/chat_template.jinja" in names
    assert "llava-hf__llava-1.5-7b-hf/chat_template.json" in names
    assert sum("Qwen" in n and "chat_template.json" in n for n in names) >= 4
    assert sum("Qwen" in n and "tokenizer_config" in n for n in names) >= 4


@pytest.mark.parametrize("name,template", [pytest.param(n, t, id=n) for n, t in reference_templates()])
def test_every_reference_template_reads_parts(name, template):
    # llava-hf's uses {% generation %} blocks (a transformers tag): parsing must know it.
    assert detect_content_format(template) == "openai", name


def test_the_demo_template_reads_parts():
    assert detect_content_format(LLAVA_CHAT_TEMPLATE) == "openai"


@pytest.mark.parametrize(
    "template",
    [
        STRING_LLAVA,
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim }}\n{% endfor %}",
        # content reached through aliases, still only printed
        "{% set loop_messages = messages[1:] %}{% set system = messages[0]['content'] %}{{ system }}"
        "{% for m in loop_messages %}{% set text = m['content'] %}{{ text }}{% endfor %}",
        # iterating something else is not iterating content
        "{% for m in messages %}{% for c in m['role'] %}{{ c }}{% endfor %}{{ m['content'] }}{% endfor %}",
        "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    ],
)
def test_string_templates(template):
    assert detect_content_format(template) == "string"


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}",
        "{% for m in messages %}{% for part in m.content %}{{ part.text }}{% endfor %}{% endfor %}",
        "{% for m in messages %}{{ m['content'] | map(attribute='text') | join(' ') }}{% endfor %}",
        "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% endif %}{% endfor %}",
        "{{ messages[0]['content'][0]['text'] }}",
        "{% for m in messages[1:] %}{% set parts = m['content'] %}{% for p in parts %}{{ p.text }}"
        "{% endfor %}{% endfor %}",
        "{% set conversation = messages %}{% for m in conversation %}"
        "{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}{{ p.text }}{% endfor %}{% endfor %}",
        "{% for m in messages %}{% generation %}{% for p in m['content'] %}{{ p.text }}{% endfor %}"
        "{% endgeneration %}{% endfor %}",
    ],
)
def test_parts_templates(template):
    assert detect_content_format(template) == "openai"


def test_an_unparseable_template_is_string():
    assert detect_content_format("{% for m in messages %}") == "string"
