"""Reading answers: the eval's sampling (cluster.toml, the model's generation config, the
built-in defaults) and the reasoning a model writes before its answer."""

from __future__ import annotations

from modelsmith.gpu.engine import Sampling
from modelsmith.gpu.model_identity import generation_defaults
from modelsmith.loop.cluster.config import Cluster

__all__ = ["eval_sampling", "split_reasoning"]

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_DEFAULT_TEMPERATURE = 0.0
_DEFAULT_TOP_P = 1.0
_DEFAULT_MAX_TOKENS = 64


def eval_sampling(cluster: Cluster) -> Sampling:
    """The eval's sampling: cluster.toml first, then the model's generation_config.json, then
    the built-in defaults (greedy, top_p 1, 64 tokens); with the cluster's stop strings and
    chat template variables."""
    cfg = cluster.config.sampling
    model = generation_defaults(cluster.base_model)
    temperature = cfg.temperature if cfg.temperature is not None else model.temperature
    top_p = cfg.top_p if cfg.top_p is not None else model.top_p
    max_tokens = cfg.max_tokens if cfg.max_tokens is not None else model.max_new_tokens
    return Sampling(
        temperature=_DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=_DEFAULT_TOP_P if top_p is None else top_p,
        max_tokens=_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        seed=cfg.seed,
        stop=list(cfg.stop),
        chat_template_kwargs=dict(cluster.config.model.chat_template_kwargs),
    )


def split_reasoning(text: str, reasoning: str | None = None) -> tuple[str, str | None]:
    """``(answer, reasoning)`` of a completion, as ``[scoring] strip_reasoning`` reads it.

    The rule (docs/scenarios.md): every ``<think>...</think>`` block is reasoning; a
    ``</think>`` with no ``<think>`` before it closes reasoning that began in the prompt (chat
    templates that open the block themselves), so all text before it is reasoning; an
    unterminated ``<think>`` (the answer ran out of tokens while thinking) makes the rest
    reasoning and leaves no answer. A server's separate ``reasoning_content`` is kept as well.
    Whitespace around the answer is trimmed. No reasoning found: ``(text, reasoning)``.
    """
    parts: list[str] = [reasoning] if reasoning else []
    answer: list[str] = []
    rest = text
    first_close = rest.find(_THINK_CLOSE)
    first_open = rest.find(_THINK_OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        parts.append(rest[:first_close])
        rest = rest[first_close + len(_THINK_CLOSE):]
    while True:
        start = rest.find(_THINK_OPEN)
        if start == -1:
            answer.append(rest)
            break
        answer.append(rest[:start])
        end = rest.find(_THINK_CLOSE, start + len(_THINK_OPEN))
        if end == -1:
            parts.append(rest[start + len(_THINK_OPEN):])
            break
        parts.append(rest[start + len(_THINK_OPEN):end])
        rest = rest[end + len(_THINK_CLOSE):]
    if len(parts) == (1 if reasoning else 0) and len(answer) == 1:
        return text, reasoning
    return "".join(answer).strip(), "\n".join(p.strip() for p in parts)
