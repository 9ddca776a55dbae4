"""The bundled ``rtb-pricing`` example cluster: an adtech domain with checkable answers.

Each scenario is a bid request; the answer is a price bucket (``low``, ``mid`` or ``high``)
decided by the inventory type and the floor price. The rubric gives partial credit: a valid
label earns format credit, the right label earns the rest. Everything is generated
deterministically so the set versions are stable across machines.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from modelsmith.atomic import atomic_write_text
from modelsmith.errors import ValidationError

CLUSTER = "rtb-pricing"
INVENTORY = {
    "premium video": "high",
    "connected tv": "high",
    "homepage takeover": "high",
    "in-app banner": "mid",
    "native feed": "mid",
    "article sidebar": "mid",
    "remnant display": "low",
    "below-fold banner": "low",
    "long-tail app": "low",
}
REGIONS = ("us-east", "eu-west", "apac", "latam")
LABELS = ("low", "mid", "high")
SYSTEM = "You price real-time bids. Answer with one word: low, mid or high."


def bid_prompt(inventory: str, region: str) -> str:
    """The question for one bid request.

    The inventory type, which decides the answer, comes last: a 2-layer model attends mostly to
    the tokens just before its answer, and with the region there it learned region habits
    instead of the pricing rule.
    """
    return f"{region} auction, {inventory}. bucket?"


def _combos(seed: int) -> list[tuple[str, str]]:
    combos = [(inv, region) for inv in sorted(INVENTORY) for region in REGIONS]
    random.Random(f"combos-{seed}").shuffle(combos)
    return combos


def _scenario(i: int, combo: tuple[str, str], set_name: str) -> dict[str, object]:
    inventory, region = combo
    bucket = INVENTORY[inventory]
    return {
        "id": f"{'ho' if set_name == 'held-out' else 'core'}-{i:03d}",
        "domain": "adtech",
        "tags": [bucket, region],
        "prompt": bid_prompt(inventory, region),
        "reference": bucket,
        "rubric": {
            "pass_mark": 0.75,
            "criteria": [
                {"type": "choice", "name": "bucket", "labels": ["low", "mid", "high"], "weight": 3},
                {"type": "length", "name": "one_word", "max_words": 2, "weight": 1},
            ],
        },
    }


def scenarios(set_name: str, count: int, seed: int, *, core_count: int = 24) -> list[dict[str, object]]:
    """Core and held-out scenarios use disjoint (inventory, region) pairs: no prompt is in both."""
    combos = _combos(seed)
    pool = combos[:core_count] if set_name == "core" else combos[core_count:]
    if count > len(pool):
        raise ValidationError(
            f"at most {len(pool)} {set_name} scenarios with core_count={core_count}",
            data={"field": "count"},
        )
    return [_scenario(i, combo, set_name) for i, combo in enumerate(pool[:count])]


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on (the domain's vocabulary)."""
    lines = [SYSTEM]
    for inventory, bucket in INVENTORY.items():
        for region in REGIONS:
            lines.append(f"{bid_prompt(inventory, region)} {bucket}")
    # The bare labels too, so each answer is one token at the start of the assistant turn.
    lines.extend(LABELS)
    return lines * 3


def warm_start_pairs(seed: int = 7) -> list[tuple[str, str]]:
    """A short supervised warm start that teaches the answer *format*, not the pricing rules.

    Every inventory type appears once with each of the three labels, so the model learns to
    answer with one label and stop, with no preference among the labels for any inventory: like
    a base model that follows the instruction but does not know the domain. Its greedy answers
    are then right about a third of the time (weak, not hopeless), and GRPO's sampled groups
    hold both right and wrong answers from the first step, which is what it learns from.
    """
    rng = random.Random(seed)
    return [(bid_prompt(inventory, rng.choice(REGIONS)), label)
            for inventory in sorted(INVENTORY) for label in LABELS]


def model_recipe() -> dict[str, Any]:
    """The demo model's whole recipe (size, seed, warm start): the cache is keyed by its hash."""
    return {
        "model": {"seed": 0, "hidden_size": 128, "num_layers": 2, "num_heads": 2},
        "warm_start": {"pairs": [list(pair) for pair in warm_start_pairs()], "steps": 60,
                       "lr": 3e-3, "seed": 0},
    }


CLUSTER_TOML = """\
# The rtb-pricing example cluster (see docs/scenarios.md and `modelsmith config schema`).
domain = "adtech"

[model]
base = "{model}"
display_name = "tiny-llama-rtb"
max_model_len = 256

[engine]
max_lora_rank = 8
max_loras = 4

[sampling]
temperature = 0.0
max_tokens = 4

[thresholds]
composite = {composite}
held_out = {held_out}

[training]
max_steps = {max_steps}
learning_rate = {learning_rate}
# Groups of 8 sampled answers for 4 prompts per step; a high learning rate suits LoRA on a
# tiny model; no KL term (beta 0): the rubric alone shapes the policy.
num_generations = 8
per_device_train_batch_size = 32
max_completion_length = 4
max_prompt_length = 64
beta = 0.0
temperature = 1.0
save_steps = 20
min_steps = 40

[training.lora]
r = 8
alpha = 16

[policy]
max_regressions = {max_regressions}
required_approvals = 1

[eval]
quick_size = 12
"""


def write_cluster(
    home: Path,
    model_dir: Path,
    *,
    core: int = 24,
    held_out: int = 12,
    seed: int = 0,
    composite: float = 0.8,
    held_out_threshold: float = 0.75,
    max_steps: int = 60,
    learning_rate: float = 5e-3,
    max_regressions: int = 2,
) -> Path:
    """Create (or refresh) ``home/rtb-pricing`` with its config and scenario sets."""
    root = home / CLUSTER
    atomic_write_text(root / "cluster.toml", CLUSTER_TOML.format(
        model=model_dir, composite=composite, held_out=held_out_threshold, max_steps=max_steps,
        learning_rate=learning_rate, max_regressions=max_regressions))
    for set_name, count in (("core", core), ("held-out", held_out)):
        chosen = scenarios(set_name, count, seed, core_count=core)
        text = yaml.safe_dump({"scenarios": chosen}, sort_keys=False)
        atomic_write_text(root / "scenarios" / set_name / "bids.yaml", text)
    (root / "inbox").mkdir(exist_ok=True)
    return root
