"""Which chat template renders conversations: the tokenizer's own, or ``data.chat_template``.

``data.chat_template`` names a ``.jinja`` file or one of the templates shipped here (:data:`NAMED_TEMPLATES`).
It is set on the tokenizer when the tokenizer is loaded or trained (:func:`apply_chat_template_setting`), so
the tokenizer saved with a run carries it, and training, validation, ``moetune eval`` and ``moetune generate``
all render with the same template. A conversation met with no template at all is an error naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

from moetune.errors import UserError

# ChatML as Qwen2/2.5 write it without tools or reasoning: every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`,
# and a tool call is a JSON object inside <tool_call> tags (Qwen2.5's tokenizer_config.json).
CHATML = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function if call.function is defined else call %}
            {{- ('\\n' if message.content or not loop.first else '') + '<tool_call>\\n{"name": "' + call.name
                + '", "arguments": ' + (call.arguments if call.arguments is string else call.arguments | tojson)
                + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML}
"""``data.chat_template`` values that name a template shipped with moetune."""

# Strings a template writes that a tokenizer must keep whole: <|im_start|>, <|end|>, <｜User｜> ...
_CONTROL_TOKEN = re.compile(r"<\|[^|<>\s'\"]+\|>|<｜[^｜<>\s'\"]+｜>")


def read_chat_template(setting: str) -> str:
    """The template text ``data.chat_template`` names: a shipped one by name, or a .jinja file's text."""
    if setting in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[setting]
    path = Path(setting)
    if not path.is_file():
        raise UserError(f"data.chat_template: {setting!r} is neither a template shipped with moetune "
                        f"({', '.join(NAMED_TEMPLATES)}) nor a file (relative paths resolve against {Path.cwd()}).")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.chat_template: cannot read {path} ({err}).") from None


def control_tokens(template: str) -> list[str]:
    """The control tokens a template writes (``<|im_start|>``-shaped strings), in order of first use: a
    tokenizer trained for it adds them as special tokens, so each stays one token."""
    return list(dict.fromkeys(_CONTROL_TOKEN.findall(template)))


def apply_chat_template_setting(tokenizer, setting: str | None):
    """``tokenizer`` with ``data.chat_template`` (when set) as its chat template; returns the tokenizer.

    A template whose control tokens the tokenizer lacks is an error: they would be split into pieces
    of text and no longer mark the turns.
    """
    if setting is None:
        return tokenizer
    template = read_chat_template(setting)
    missing = [token for token in control_tokens(template) if token not in tokenizer.get_vocab()]
    if missing:
        raise UserError(f"data.chat_template {setting!r} writes {', '.join(missing)}, which the tokenizer does not have "
                        "as tokens; use the tokenizer's own template (data.chat_template: null) or one written with its "
                        "special tokens.")
    tokenizer.chat_template = template
    return tokenizer


def chat_template_of(tokenizer) -> str | None:
    """The tokenizer's chat template text, or None. Of several named ones, the ``default``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def require_chat_template(tokenizer, what: str) -> str:
    """The tokenizer's chat template; a UserError naming ``data.chat_template`` when it has none."""
    template = chat_template_of(tokenizer)
    if template is None:
        raise UserError(f"{what} needs a chat template, and the tokenizer has none: set data.chat_template to a .jinja "
                        f"file or one shipped with moetune ({', '.join(NAMED_TEMPLATES)}).")
    return template
