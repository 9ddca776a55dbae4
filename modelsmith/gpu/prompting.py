"""Prompt rendering: the one place a scenario prompt becomes the text a model sees.

Eval (the inference engines) and training (the GRPO trainer, the warm start) both call
:func:`render_prompt`, so a model is trained on exactly the prompts it is later graded on. A plain
text prompt is a single user message; chat messages go through the tokenizer's own chat template
with the generation prompt appended.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from modelsmith.errors import NotFound, ValidationError

__all__ = ["ChatTemplateTokenizer", "load_tokenizer", "messages_for", "render_prompt"]

PromptInput = str | Sequence[Mapping[str, str]]


class ChatTemplateTokenizer(Protocol):
    """What rendering needs of a tokenizer (a transformers tokenizer satisfies it)."""

    chat_template: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def messages_for(prompt: PromptInput) -> list[dict[str, str]]:
    """The chat messages for ``prompt``: a text becomes one user message; messages are checked."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages: list[dict[str, str]] = []
    for index, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise ValidationError(
                "a chat message must be a mapping with 'role' and 'content'",
                data={"field": f"messages[{index}]"},
            )
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValidationError(
                "a chat message needs a string 'role' and a string 'content'",
                data={"field": f"messages[{index}]"},
            )
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValidationError(
            "a chat prompt needs at least one message", data={"field": "messages"}
        )
    return messages


def render_prompt(
    tokenizer: ChatTemplateTokenizer,
    prompt: PromptInput,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Render ``prompt`` with the tokenizer's chat template, ending in the generation prompt.

    ``chat_template_kwargs`` (``[model] chat_template_kwargs``, e.g. ``{"enable_thinking":
    False}``) are passed to the template as variables, as vLLM and transformers pass them.
    Raises ValidationError when the messages are malformed or the tokenizer has no chat template.
    """
    messages = messages_for(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValidationError(
            "the model's tokenizer has no chat template", data={"field": "chat_template"}
        )
    try:
        rendered = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            **dict(chat_template_kwargs or {}),
        )
    except Exception as exc:  # jinja2 errors from a template that rejects these messages
        raise ValidationError(
            f"the chat template could not render the prompt: {exc}",
            data={"field": "chat_template"},
        ) from exc
    if not isinstance(rendered, str):
        raise ValidationError(
            "the chat template did not render to text", data={"field": "chat_template"}
        )
    return rendered


def load_tokenizer(model_dir: Path) -> Any:
    """Load the tokenizer saved in ``model_dir`` (local files only, never a hub)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NotFound(f"no model directory at {model_dir}", data={"file": str(model_dir)})
    # transformers is heavy: imported only when a tokenizer is needed.
    transformers: Any = importlib.import_module("transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValidationError(
            f"no loadable tokenizer in {model_dir}: {exc}", data={"file": str(model_dir)}
        ) from exc
