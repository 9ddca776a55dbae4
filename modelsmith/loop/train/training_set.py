"""The training set of an iteration: core-set failures of an eval, never a held-out scenario.

The manifest records the ids and content hashes used and the proof that none of them is in the
held-out set (by id, by content hash and by prompt hash, so a held-out scenario copied into the
core set under a new id is caught too). Synthetic scenarios (``--target failures+synthetic``)
are also checked for near-duplicate prompts of held-out ones (the measure and threshold of
:mod:`modelsmith.loop.synth.similarity`, as when they were kept). A violation raises
LeakageError and nothing is trained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from modelsmith.errors import LeakageError, ValidationError
from modelsmith.gpu.model_identity import base_model_identity
from modelsmith.loop.eval.aggregate import by_scenario
from modelsmith.loop.scoring.scenarios import Scenario, ScenarioCatalog, prompt_hash, scenario_hash
from modelsmith.rpc.schema.evals import ScenarioResult


class ScenarioRef(msgspec.Struct, kw_only=True):
    id: str
    hash: str
    prompt_hash: str


class LeakageProof(msgspec.Struct, kw_only=True):
    ok: bool
    checked: int
    held_out_count: int
    held_out_ids_sha256: str
    held_out_hashes_sha256: str
    violations: list[str]
    # Synthetic scenarios checked for near-duplicate held-out prompts, and the threshold used.
    near_duplicates_checked: int = 0
    near_duplicate_threshold: float | None = None


class TrainingManifest(msgspec.Struct, kw_only=True):
    job_id: str
    cluster: str
    iteration: int
    eval_tag: str
    base_model: str
    init_adapter: str | None
    scenario_sets: dict[str, str]
    scenarios: list[ScenarioRef]
    leakage_check: LeakageProof
    near_miss_margin: float
    metrics_log: str
    created_at: str
    # A content hash of the base model's config.json and weights index
    # (modelsmith.gpu.model_identity); None for manifests written before it existed, or a
    # base with no local config.json.
    base_model_sha256: str | None = None


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()


def leakage_check(refs: Sequence[ScenarioRef], held_out: Sequence[Scenario],
                  synthetic: Sequence[Scenario] = (), *,
                  near_duplicate_threshold: float | None = None) -> LeakageProof:
    """Exact checks (id, content hash, prompt hash) on every ref; with a threshold, also the
    near-duplicate check of each ``synthetic`` scenario's prompt against the held-out prompts."""
    ids = {s.id for s in held_out}
    hashes = {scenario_hash(s) for s in held_out}
    prompts = {prompt_hash(s) for s in held_out}
    violations = {
        r.id for r in refs if r.id in ids or r.hash in hashes or r.prompt_hash in prompts
    }
    if near_duplicate_threshold is not None and synthetic:
        from modelsmith.loop.synth.similarity import PromptIndex

        index = PromptIndex.of(held_out, near_duplicate_threshold)
        violations |= {s.id for s in synthetic if index.near(s) is not None}
    return LeakageProof(
        ok=not violations, checked=len(refs), held_out_count=len(held_out),
        held_out_ids_sha256=_digest(list(ids)), held_out_hashes_sha256=_digest(list(hashes)),
        violations=sorted(violations),
        near_duplicates_checked=len(synthetic) if near_duplicate_threshold is not None else 0,
        near_duplicate_threshold=near_duplicate_threshold,
    )


def select_training_scenarios(
    catalog: ScenarioCatalog, results: Sequence[ScenarioResult], *, near_miss_margin: float
) -> list[Scenario]:
    """Core scenarios that failed (or passed by less than the margin) in ``results``.

    An eval with repeated trials is judged per scenario, its trials folded as the summary folds
    them (mean score, passed by a majority): each scenario is picked at most once.
    """
    picked: list[Scenario] = []
    for r in by_scenario(results):
        if r.set != "core":
            continue
        if r.passed and r.score >= r.pass_mark + near_miss_margin:
            continue
        scenario = catalog.get(r.scenario_id)
        if scenario is None or scenario.set != "core":
            continue
        picked.append(scenario)
    if not picked:
        raise ValidationError("the eval has no core failures to train on", data={"field": "eval_tag"})
    return sorted(picked, key=lambda s: s.id)


def select_synthetic(catalog: ScenarioCatalog, provenance: Mapping[str, Mapping[str, Any]],
                     patterns: Collection[str]) -> list[Scenario]:
    """The synthetic scenarios made for one of ``patterns`` (by their provenance), sorted."""
    synthetic = catalog.sets.get("synthetic")
    return sorted((s for s in (synthetic.scenarios if synthetic else ())
                   if provenance.get(s.id, {}).get("pattern") in patterns), key=lambda s: s.id)


def build_manifest(
    *, scenarios: Sequence[Scenario], catalog: ScenarioCatalog,
    near_duplicate_threshold: float | None = None, **fields: Any
) -> TrainingManifest:
    """The manifest of ``scenarios``; LeakageError when any of them is (near) held-out.
    ``near_duplicate_threshold`` turns on the near-duplicate check of the synthetic ones."""
    refs = [ScenarioRef(id=s.id, hash=scenario_hash(s), prompt_hash=prompt_hash(s)) for s in scenarios]
    proof = leakage_check(refs, list(catalog.held_out.scenarios),
                          [s for s in scenarios if s.set == "synthetic"],
                          near_duplicate_threshold=near_duplicate_threshold)
    if not proof.ok:
        raise LeakageError(
            f"held-out scenarios would reach training: {', '.join(proof.violations)}",
            data={"violations": proof.violations},
        )
    if "base_model_sha256" not in fields and "base_model" in fields:
        identity = base_model_identity(Path(fields["base_model"]))
        fields["base_model_sha256"] = identity.sha256 if identity else None
    return TrainingManifest(scenarios=refs, leakage_check=proof, scenario_sets=catalog.versions(), **fields)
