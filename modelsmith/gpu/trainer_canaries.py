"""Canary answers recorded by the trainer after training: ``canaries.json`` in the adapter dir.

The format and the replay rule are the contract documented in :mod:`modelsmith.gpu.trainer_spec`
(greedy token ids, raw-logit log-probabilities, :data:`CANARY_LOGPROB_TOLERANCE`).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "CANARIES_FILE",
    "CANARY_FORMAT",
    "CANARY_LOGPROB_TOLERANCE",
    "Canary",
    "CanaryFile",
    "decode_canaries",
    "encode_canaries",
    "record_canaries",
]

CANARIES_FILE = "canaries.json"
CANARY_FORMAT = 1
# Absolute, per token, natural log: see trainer_spec's module docstring for why 0.05.
CANARY_LOGPROB_TOLERANCE = 0.05


class Canary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scenario_id: str
    prompt_text: str
    completion_text: str
    completion_token_ids: list[int]
    token_logprobs: list[float]


class CanaryFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    tolerance: float
    canaries: list[Canary]


def encode_canaries(canaries: list[Canary]) -> bytes:
    record = CanaryFile(format=CANARY_FORMAT, tolerance=CANARY_LOGPROB_TOLERANCE, canaries=canaries)
    return msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n"


def decode_canaries(data: bytes) -> CanaryFile:
    return msgspec.json.decode(data, type=CanaryFile)


def record_canaries(
    model: Any, tokenizer: Any, prompts: list[tuple[str, str]], max_new_tokens: int
) -> list[Canary]:
    """Greedy answers of ``model`` to each (scenario_id, rendered prompt), with token logprobs."""
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    canaries = []
    try:
        for scenario_id, text in prompts:
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids], device=device)
            completion: list[int] = []
            logprobs: list[float] = []
            with torch.no_grad():
                # Token by token on the full sequence: the logprob of each greedy token comes from
                # the same forward pass that chose it (no cache, no sampler processing).
                for _ in range(max_new_tokens):
                    logits = model(input_ids=ids).logits[0, -1].float()
                    log_softmax = torch.log_softmax(logits, dim=-1)
                    token = int(torch.argmax(log_softmax))
                    completion.append(token)
                    logprobs.append(float(log_softmax[token]))
                    if token == eos:
                        break
                    ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
            canaries.append(
                Canary(
                    scenario_id=scenario_id,
                    prompt_text=text,
                    completion_text=tokenizer.decode(completion, skip_special_tokens=True),
                    completion_token_ids=completion,
                    token_logprobs=logprobs,
                )
            )
    finally:
        model.train(was_training)
    return canaries
