"""The bundled ``rtb-pricing`` example cluster: an adtech domain with checkable answers.

Each scenario is a bid request; the answer is a price bucket (``low``, ``mid`` or ``high``)
decided by the inventory type; the region is noise. Core uses the nine types of
:data:`INVENTORY`; held-out asks about them in other regions (tag ``seen-type``) and, when
``write_cluster(unseen_held_out=N)`` asks for it, about the types of :data:`UNSEEN_INVENTORY`
(tag ``unseen-type``), which no core scenario uses but the base model read about in its
pretraining prose: the first measures robustness to a noise word, the second generalisation. The rubric gives partial credit: a valid
label earns format credit, the right label earns the rest. Everything is generated
deterministically so the set versions are stable across machines.

The demo's base model is built like a real one, in two steps: it *reads* about the domain
(:func:`domain_corpus`: prose about which inventory sells high, mid or low, never in the
question-and-answer form of the task) and is then taught the answer *format* only
(:func:`warm_start_pairs`: one label and stop, with no preference among the labels). So it knows
the facts but has never been asked to use them: its answers start at chance, and GRPO on the
rubric's reward teaches it to connect what it read to the answer.
"""

from __future__ import annotations

import random
import re
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
# Types the base model reads about (pretraining prose, format warm start) but no core scenario
# asks about: held-out scenarios on them measure whether training generalised from what the
# model read, not only whether it ignores the region.
UNSEEN_INVENTORY = {
    "streaming audio": "high",
    "sponsored listing": "mid",
    "exit popup": "low",
}
REGIONS = ("us-east", "us-west", "eu-west", "eu-north", "apac", "latam")
LABELS = ("low", "mid", "high")
SYSTEM = "You price real-time bids. Answer with one word: low, mid or high."
# Regions of the format-only warm start: none is in any scenario, so no scenario's prompt (and
# no held-out prompt) is ever seen before training.
WARM_START_REGIONS = ("global", "mena", "oceania")
# What the base model reads about each bucket: prose, not the task's question and answer.
_FACTS = {
    "high": ("{inv} is premium inventory: buyers pay high prices for it.",
             "advertisers value {inv} highly; its price is high.",
             "{inv} sells at a high price."),
    "mid": ("{inv} is standard inventory: buyers pay mid prices for it.",
            "advertisers value {inv} moderately; its price is mid.",
            "{inv} sells at a mid price."),
    "low": ("{inv} is remnant inventory: buyers pay low prices for it.",
            "advertisers value {inv} little; its price is low.",
            "{inv} sells at a low price."),
}
# Region noise: regions appear next to every inventory type with no bearing on its price.
_NOISE = ("{region} auctions run all day.", "{region} buyers bid on {inv}.",
          "in {region}, {inv} is traded in real time.", "{region} traffic peaks in the evening.")


def bid_prompt(inventory: str, region: str) -> str:
    """The question for one bid request.

    The inventory type, which decides the answer, comes last: a 2-layer model attends mostly to
    the tokens just before its answer, and with the region there it learned region habits
    instead of the pricing rule.
    """
    return f"{region} auction, {inventory}. bucket?"


def _combos(seed: int) -> list[tuple[str, str]]:
    """Every (inventory, region) pair, in layers: layer k holds each inventory once.

    Each inventory's regions are shuffled (seeded); layer k takes its k-th region. Core takes
    the first layers and held-out the rest, so both sets cover every inventory type evenly
    (labels balanced) and no (inventory, region) pair is in both: held-out asks about regions
    the model was never trained on for that inventory.
    """
    rng = random.Random(f"combos-{seed}")
    regions_of = {inv: rng.sample(REGIONS, len(REGIONS)) for inv in sorted(INVENTORY)}
    combos: list[tuple[str, str]] = []
    for layer in range(len(REGIONS)):
        row = [(inv, regions_of[inv][layer]) for inv in sorted(INVENTORY)]
        rng.shuffle(row)
        combos.extend(row)
    return combos


def _scenario(i: int, combo: tuple[str, str], set_name: str) -> dict[str, object]:
    inventory, region = combo
    unseen = inventory in UNSEEN_INVENTORY
    bucket = UNSEEN_INVENTORY[inventory] if unseen else INVENTORY[inventory]
    prefix = "ho-new" if unseen else "ho" if set_name == "held-out" else "core"
    kind = ["unseen-type" if unseen else "seen-type"] if set_name == "held-out" else []
    return {
        "id": f"{prefix}-{i:03d}",
        "domain": "adtech",
        "tags": [bucket, region, *kind],
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


def unseen_scenarios(count: int, seed: int) -> list[dict[str, object]]:
    """Held-out scenarios on :data:`UNSEEN_INVENTORY` (every type evenly, regions shuffled)."""
    rng = random.Random(f"unseen-{seed}")
    regions_of = {inv: rng.sample(REGIONS, len(REGIONS)) for inv in sorted(UNSEEN_INVENTORY)}
    combos = [(inv, regions_of[inv][layer]) for layer in range(len(REGIONS))
              for inv in sorted(UNSEEN_INVENTORY)]
    if count > len(combos):
        raise ValidationError(f"at most {len(combos)} unseen-type held-out scenarios",
                              data={"field": "unseen_held_out"})
    return [_scenario(i, combo, "held-out") for i, combo in enumerate(combos[:count])]


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


def domain_corpus() -> list[str]:
    """Plain text about the domain that the base model is pretrained on (knowledge, no task)."""
    lines: list[str] = []
    for inventory, bucket in [*INVENTORY.items(), *UNSEEN_INVENTORY.items()]:
        lines.extend(fact.format(inv=inventory) for fact in _FACTS[bucket])
        for region in REGIONS:
            lines.extend(noise.format(inv=inventory, region=region) for noise in _NOISE)
    return lines


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on (the domain's vocabulary)."""
    lines = [SYSTEM]
    for inventory, bucket in INVENTORY.items():
        for region in REGIONS:
            lines.append(f"{bid_prompt(inventory, region)} {bucket}")
    # The unseen types' questions without their answers: the tokenizer learns the words only.
    lines.extend(bid_prompt(inventory, region) for inventory in UNSEEN_INVENTORY
                 for region in REGIONS)
    # The bare labels too, so each answer is one token at the start of the assistant turn.
    lines.extend(LABELS)
    return [*(lines * 3), *(f"{prompt} {label}" for prompt, label in warm_start_pairs()),
            *domain_corpus()]


def warm_start_pairs() -> list[tuple[str, str]]:
    """A short supervised warm start that teaches the answer *format*, not the pricing rules.

    Every prompt appears once with each of the three labels, so the model learns to answer with
    one label and stop, with no preference among the labels for any prompt: like a base model
    that follows the instruction but was never asked this question. The prompts use regions of
    their own (:data:`WARM_START_REGIONS`), so no scenario's prompt is seen here and no region
    gets a spurious label preference. The unseen types (:data:`UNSEEN_INVENTORY`) are in it too,
    so a held-out question about them fails on substance, not on an unfamiliar format. Its greedy answers are then right about a third of the
    time (weak, not hopeless), and GRPO's sampled groups hold both right and wrong answers from
    the first step, which is what it learns from.
    """
    return [(bid_prompt(inventory, region), label)
            for inventory in sorted([*INVENTORY, *UNSEEN_INVENTORY]) for region in WARM_START_REGIONS for label in LABELS]


def model_recipe() -> dict[str, Any]:
    """The demo model's whole recipe (size, seed, pretraining, warm start): the cache key."""
    return {
        "model": {"seed": 0, "hidden_size": 128, "num_layers": 2, "num_heads": 2},
        "pretrain": {"texts": domain_corpus(), "steps": 300, "lr": 3e-3, "batch_size": 32,
                     "seed": 0},
        "warm_start": {"pairs": [list(pair) for pair in warm_start_pairs()], "steps": 60,
                       "lr": 3e-3, "seed": 0},
    }


# Regions of synthetic scenarios (:func:`synthesise`): in no hand-written scenario and not in the
# warm start, so a synthetic prompt is never a copy of a core or held-out one.
SYNTH_REGIONS = ("south-africa", "new-zealand", "central-asia", "scandinavia", "pacific-islands",
                 "caribbean")
_BID_PROMPT = re.compile(r"\A(?P<region>[a-z-]+) auction, (?P<inventory>[a-z -]+)\. bucket\?\Z")


def synthesise(pattern: dict[str, Any], sources: list[dict[str, Any]], count: int
               ) -> list[dict[str, Any]]:
    """The cluster's ``[synthesis] generator``: up to ``count`` new bid requests like the failed
    ``sources``, exact by construction.

    Each keeps its source's inventory type and rubric and asks about a region of
    :data:`SYNTH_REGIONS`; its reference is the type's bucket looked up in :data:`INVENTORY`
    (re-derived, not the source's reference copied). A source whose prompt is not a bid request
    of a known type yields nothing.
    """
    usable = []
    for source in sources:
        match = _BID_PROMPT.match(source["prompt"]) if isinstance(source["prompt"], str) else None
        if match and match["inventory"] in INVENTORY:
            usable.append((source, match["inventory"]))
    out: list[dict[str, Any]] = []
    for k in range(min(count, len(usable) * len(SYNTH_REGIONS))):
        source, inventory = usable[k % len(usable)]
        region = SYNTH_REGIONS[(k // len(usable)) % len(SYNTH_REGIONS)]
        bucket = INVENTORY[inventory]
        out.append({"source_id": source["id"], "prompt": bid_prompt(inventory, region),
                    "reference": bucket, "rubric": source["rubric"], "tags": [bucket, region]})
    return out


CLUSTER_TOML = """\
# The rtb-pricing example cluster (see docs/scenarios.md and `modelsmith config schema`).
domain = "adtech"

[model]
base = "{model}"
display_name = "tiny-llama-rtb"
max_model_len = 256

[engine]
max_lora_rank = {lora_rank}
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
# Groups of 8 sampled answers for 4 prompts per step. A small KL term (beta) keeps the policy
# near the base model, so it does not collapse onto one label before it has learned which
# label fits which inventory.
num_generations = 8
per_device_train_batch_size = 32
max_completion_length = 4
max_prompt_length = 64
beta = 0.04
temperature = 1.0
save_steps = 20
min_steps = 20
# With --target failures+near_misses, a margin of 1.0 trains on every core scenario: answers
# that are already right keep being reinforced while the wrong ones are fixed.
near_miss_margin = 1.0

[training.lora]
# Every linear layer of the tiny model (the default target_modules).
r = {lora_rank}
alpha = {lora_alpha}

[policy]
max_regressions = {max_regressions}
required_approvals = 1

[eval]
quick_size = 12

[synthesis]
# Exact synthetic scenarios for `modelsmith synth` (no teacher model needed).
generator = "modelsmith.examples.rtb_pricing:synthesise"
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
    max_steps: int = 100,
    learning_rate: float = 2e-3,
    max_regressions: int = 2,
    lora_rank: int = 8,
    unseen_held_out: int = 0,
) -> Path:
    """Create (or refresh) ``home/rtb-pricing`` with its config and scenario sets.

    ``lora_rank`` is the adapter's rank (alpha is twice it) and the engine's largest; the demo
    uses 16, the default 8 fits engines started with ``--max-lora-rank 8``.
    ``unseen_held_out`` adds that many held-out scenarios on :data:`UNSEEN_INVENTORY`.
    """
    root = home / CLUSTER
    atomic_write_text(root / "cluster.toml", CLUSTER_TOML.format(
        model=model_dir, composite=composite, held_out=held_out_threshold, max_steps=max_steps,
        learning_rate=learning_rate, max_regressions=max_regressions, lora_rank=lora_rank,
        lora_alpha=2 * lora_rank))
    for set_name, count in (("core", core), ("held-out", held_out)):
        chosen = scenarios(set_name, count, seed, core_count=core)
        if set_name == "held-out":
            chosen += unseen_scenarios(unseen_held_out, seed)
        text = yaml.safe_dump({"scenarios": chosen}, sort_keys=False)
        atomic_write_text(root / "scenarios" / set_name / "bids.yaml", text)
    (root / "inbox").mkdir(exist_ok=True)
    return root
