"""The bundled ``rtb-pricing`` example cluster: an adtech domain with checkable answers.

Each scenario is a bid request; the answer is a price bucket (``low``, ``mid`` or ``high``)
decided by the inventory type and the floor price. The rubric gives partial credit: a valid
label earns format credit, the right label earns the rest. Everything is generated
deterministically so the set versions are stable across machines.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from modelsmith.atomic import atomic_write_text

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
SYSTEM = "You price real-time bids. Answer with one word: low, mid or high."


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
        "prompt": f"{inventory} in {region}. bucket?",
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
        raise ValueError(f"at most {len(pool)} {set_name} scenarios with core_count={core_count}")
    return [_scenario(i, combo, set_name) for i, combo in enumerate(pool[:count])]


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on (the domain's vocabulary)."""
    lines = [SYSTEM]
    for inventory, bucket in INVENTORY.items():
        for region in REGIONS:
            lines.append(f"{inventory} in {region}. bucket? {bucket}")
    return lines * 3


def warm_start_pairs(count: int = 24, seed: int = 7) -> list[tuple[str, str]]:
    """A short, partial supervised warm start: the model sees some mappings, not all."""
    rng = random.Random(seed)
    known = sorted(INVENTORY)[::2]
    return [(f"{inv} in {rng.choice(REGIONS)}. bucket?", INVENTORY[inv])
            for inv in (rng.choice(known) for _ in range(count))]


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
num_generations = 4
per_device_train_batch_size = 8
max_completion_length = 4
max_prompt_length = 64
beta = 0.0
temperature = 1.0
save_steps = 20
min_steps = 20

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
    learning_rate: float = 2e-3,
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
