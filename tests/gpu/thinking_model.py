"""A copy of the tiny model whose chat template has a Qwen3-style thinking switch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Thinking is on unless the caller passes enable_thinking=false, as in Qwen3's template.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}"
    "{% if enable_thinking is not defined or enable_thinking %}{{ '<think>' }}{% endif %}"
    "{% endif %}"
)


def thinking_model(tiny_model_dir: Path, dest: Path) -> Path:
    """Copy ``tiny_model_dir`` to ``dest`` with :data:`THINKING_TEMPLATE` as its chat template
    (in ``chat_template.jinja``, which transformers 5 reads, and ``tokenizer_config.json``)."""
    shutil.copytree(tiny_model_dir, dest)
    (dest / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINKING_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return dest
