"""The promotion policy gate: every rule a candidate must pass before a human is asked.

:func:`check_policy` judges a cluster's candidate adapter and one of its evals against the
policy in ``cluster.toml`` (``[thresholds]`` and ``[policy]``) and returns *every* rule's
outcome, so an agent learns everything it has to fix from one call. Rules (stable names):

``cluster_state``       no promotion request is pending and the cluster is not training
``candidate``           there is a candidate adapter (a trained iteration not yet promoted)
``eval_found``          the eval exists, finished, and its summary matches the ledger's hash
``eval_full``           the eval covered the held-out set (type ``full``, not ``--quick``)
``eval_of_candidate``   the eval was of the candidate adapter ...
``adapter_hash``        ... whose files still hash to what was evaluated
``scenario_sets``       the eval used the current governed scenario-set versions
``composite``           composite >= ``thresholds.composite`` (with ``[policy] gate_on =
                        "lower_bound"``: the lower bound of its 95% interval)
``held_out``            held-out score >= ``thresholds.held_out`` (likewise)
``regressions``         scenarios passing under the champion (or, before the first promotion, in
                        the newest eval of the base model) and failing now <= ``max_regressions``
``paired_regression``   the candidate is not significantly worse than that baseline, paired by
                        scenario, at ``[policy] regression_alpha`` (exact McNemar on pass/fail,
                        exact sign test on scores; passes when the alpha is 0)
``training_manifest``   the candidate's training manifest exists and matches the ledger
``leakage``             the manifest's own leakage check passed, and none of its training
                        scenarios (by id, content hash or prompt hash) is in today's held-out set
``judge_agreement``     every judge the eval's scenarios use has a ``judge check`` of its current
                        identity (engine + model, template, calibration set) with Cohen's kappa
                        >= ``[policy] min_judge_agreement`` (passes when that is unset;
                        docs/judges.md)

Blocking (reads files, hashes an adapter): call it from a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from modelsmith.errors import ModelsmithError
from modelsmith.hashing import sha256_hex
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.cluster.state import LoopState
from modelsmith.loop.eval.aggregate import by_scenario
from modelsmith.loop.eval.run import (
    RESULTS_FILE,
    SUMMARY_FILE,
    eval_dir,
    gated_value,
    read_results,
    read_summary,
    regressions_against,
)
from modelsmith.loop.eval.stats import paired_test, significantly_worse
from modelsmith.loop.records.events import EvalFinished, IterationAdvanced
from modelsmith.loop.records.ledger import Ledger
from modelsmith.loop.scoring.scenarios import prompt_hash, scenario_hash
from modelsmith.rpc.schema.evals import EvalSummary, PairedTest, ScenarioResult
from modelsmith.rpc.schema.promotion import PolicyCheck, PolicyReport

__all__ = [
    "TRAINING_MANIFEST",
    "GateEvidence",
    "check_policy",
    "default_eval_tag",
    "iteration_of",
]

TRAINING_MANIFEST = "training_manifest.json"

# Phases in which a new request makes no sense: the candidate is about to change or be judged.
_BLOCKING_PHASES = frozenset({LoopState.TRAINING, LoopState.AWAITING_APPROVAL, LoopState.FAILED})


def iteration_of(adapter: str | None) -> int:
    """``"iter-17"`` -> 17; the base model (None) is iteration 0."""
    if adapter is None:
        return 0
    prefix, _, number = adapter.rpartition("-")
    return int(number) if prefix == "iter" and number.isdigit() else 0


def default_eval_tag(ledger: Ledger, candidate: str | None) -> str | None:
    """The newest finished eval of ``candidate``; else the newest eval (so the gate says why)."""
    finished = [r for r in ledger.find(EvalFinished) if r.event.own_evidence()]
    for recorded in reversed(finished):
        if candidate is not None and recorded.event.adapter == candidate:
            return recorded.event.tag
    return finished[-1].event.tag if finished else None


def _eval_entry(ledger: Ledger, tag: str) -> EvalFinished | None:
    for recorded in reversed(ledger.find(EvalFinished)):
        if recorded.event.tag == tag:
            return recorded.event
    return None


def _base_eval_tag(ledger: Ledger) -> str | None:
    for recorded in reversed(ledger.find(EvalFinished)):
        if recorded.event.adapter is None and recorded.event.own_evidence():
            return recorded.event.tag
    return None


def _iteration_entry(ledger: Ledger, adapter: str) -> IterationAdvanced | None:
    for recorded in reversed(ledger.find(IterationAdvanced)):
        if recorded.event.adapter == adapter:
            return recorded.event
    return None


@dataclass
class GateEvidence:
    """What the gate looked at: the report plus the facts a promotion record binds."""

    report: PolicyReport
    summary: EvalSummary | None = None
    summary_sha256: str | None = None
    adapter_sha256: str | None = None
    training_manifest: dict[str, Any] | None = None
    training_manifest_sha256: str | None = None
    champion: str | None = None
    champion_eval_tag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Checks:
    def __init__(self) -> None:
        self.items: list[PolicyCheck] = []

    def add(self, check: str, passed: bool, detail: str) -> bool:
        self.items.append(PolicyCheck(check=check, passed=passed, detail=detail))
        return passed


def check_policy(runtime: ClusterRuntime, eval_tag: str | None = None) -> GateEvidence:
    """Judge ``runtime``'s candidate and ``eval_tag`` (default: its newest eval); see module doc.

    Never raises for a failing rule; raises Unavailable when the cluster's ledger or scenario
    sets are not loaded (there is nothing to judge against).
    """
    ledger = runtime.require_ledger()
    catalog = runtime.require_catalog()
    checks = _Checks()
    candidate = runtime.candidate
    tag = eval_tag if eval_tag is not None else default_eval_tag(ledger, candidate)
    evidence = GateEvidence(report=PolicyReport(
        cluster=runtime.cluster.name, iteration=runtime.iteration, adapter=candidate,
        eval_tag=tag, composite=None, held_out=None, passed=False, checks=[]))
    evidence.champion = runtime.champion
    evidence.champion_eval_tag = runtime.state.champion_eval_tag

    blocked = runtime.pending_promotion is not None or runtime.phase in _BLOCKING_PHASES
    pending = f"request {runtime.pending_promotion} awaits a decision; approve or reject it first"
    checks.add("cluster_state", not blocked,
               pending if runtime.pending_promotion else f"cluster is {runtime.phase}")
    checks.add("candidate", candidate is not None,
               f"candidate adapter {candidate}" if candidate else
               "no candidate adapter: train an iteration first (or it was promoted already)")

    summary = _check_eval(runtime, ledger, tag, checks, evidence)
    _check_adapter(runtime, candidate, summary, checks, evidence)
    current_sets = catalog.versions()
    if summary is None:
        checks.add("scenario_sets", False, "no eval to compare scenario-set versions with")
    else:
        # The synthetic set is never in the gate: a synth job stales no evidence.
        stale = sorted(k for k in (set(current_sets) | set(summary.scenario_sets)) - {"synthetic"}
                       if current_sets.get(k) != summary.scenario_sets.get(k))
        checks.add("scenario_sets", not stale,
                   "eval used the current governed scenario sets" if not stale else
                   f"sets changed since the eval: {', '.join(stale)}; run a new full eval")
    _check_scores(runtime, summary, checks, evidence)
    _check_training(runtime, ledger, candidate, checks, evidence)
    _check_judges(runtime, summary, checks, evidence)

    passed = all(item.passed for item in checks.items)
    paired = evidence.extra.get("paired")
    evidence.report = PolicyReport(
        cluster=runtime.cluster.name, iteration=runtime.iteration, adapter=candidate,
        eval_tag=tag, composite=summary.composite if summary else None,
        held_out=summary.held_out if summary else None, passed=passed, checks=checks.items,
        paired=paired if isinstance(paired, PairedTest) else None,
        paired_baseline_tag=evidence.extra.get("paired_baseline_tag"))
    return evidence


def _check_eval(runtime: ClusterRuntime, ledger: Ledger, tag: str | None, checks: _Checks,
                evidence: GateEvidence) -> EvalSummary | None:
    if tag is None:
        checks.add("eval_found", False, "no finished eval: run `modelsmith eval` (type full)")
        checks.add("eval_full", False, "no eval")
        return None
    try:
        summary = read_summary(runtime, tag)
        summary_bytes = (eval_dir(runtime, tag) / SUMMARY_FILE).read_bytes()
    except ModelsmithError as exc:
        checks.add("eval_found", False, exc.message)
        checks.add("eval_full", False, "no eval")
        return None
    evidence.summary = summary
    evidence.summary_sha256 = sha256_hex(summary_bytes)
    entry = _eval_entry(ledger, tag)
    if entry is None:
        checks.add("eval_found", False, f"eval {tag} has no eval.finished entry in the ledger")
    elif entry.summary_sha256 != evidence.summary_sha256:
        checks.add("eval_found", False,
                   f"evals/{tag}/summary.json does not match the hash in the ledger (altered?)")
    else:
        checks.add("eval_found", True, f"eval {tag} finished and matches the ledger")
    full = summary.type == "full" and not summary.quick
    kind = f"{summary.type}{' --quick' if summary.quick else ''}"
    checks.add("eval_full", full, f"eval type {kind}" if full else
               f"eval type is {kind}; the gate needs a full eval (core + held-out, not --quick)")
    return summary


def _check_adapter(runtime: ClusterRuntime, candidate: str | None, summary: EvalSummary | None,
                   checks: _Checks, evidence: GateEvidence) -> None:
    if summary is None or candidate is None:
        checks.add("eval_of_candidate", False, "no eval of a candidate to check")
        checks.add("adapter_hash", False, "no candidate adapter to hash")
        return
    if summary.engine is not None:
        checks.add("eval_of_candidate", False,
                   f"eval ran on the named engine {summary.engine!r}, not the cluster's own: "
                   "a comparison is never promotion evidence")
    else:
        checks.add("eval_of_candidate", summary.adapter == candidate,
                   f"eval is of {candidate}" if summary.adapter == candidate else
                   f"eval is of {summary.adapter or 'the base model'}, not the candidate "
                   f"{candidate}; run `modelsmith eval --adapter candidate`")
    from modelsmith.gpu.adapters import verify_adapter

    try:
        manifest = verify_adapter(runtime.adapter_path(candidate))
    except ModelsmithError as exc:
        checks.add("adapter_hash", False, f"adapter {candidate} does not verify: {exc.message}")
        return
    evidence.adapter_sha256 = manifest.adapter_sha256
    same = summary.adapter_hash == manifest.adapter_sha256
    checks.add("adapter_hash", same,
               f"adapter {candidate} is the one evaluated ({manifest.adapter_sha256[:12]})" if same
               else f"adapter {candidate} hashes to {manifest.adapter_sha256[:12]}, the eval saw "
               f"{(summary.adapter_hash or 'none')[:12]}; re-run the eval")


def _score_detail(name: str, point: float | None, ci95: list[float] | None, gate_on: str,
                  threshold: float) -> str:
    if point is None:
        return f"the eval has no {name} score"
    interval = f" [{ci95[0]:.3f}, {ci95[1]:.3f}]" if ci95 is not None else ""
    if gate_on == "lower_bound":
        if ci95 is None:
            return (f"{name} {point:.3f} has no interval (an older eval) and [policy] gate_on is "
                    "lower_bound; re-run the eval")
        return f"{name} lower bound {ci95[0]:.3f} (of {point:.3f}{interval}) vs threshold {threshold:.3f}"
    return f"{name} {point:.3f}{interval} vs threshold {threshold:.3f}"


def _check_scores(runtime: ClusterRuntime, summary: EvalSummary | None, checks: _Checks,
                  evidence: GateEvidence) -> None:
    thresholds = runtime.cluster.config.thresholds
    policy = runtime.cluster.config.policy
    if summary is None:
        for name in ("composite", "held_out", "regressions", "paired_regression"):
            checks.add(name, False, "no eval")
        return
    composite = gated_value(policy.gate_on, summary.composite, summary.composite_ci95)
    checks.add("composite", composite is not None and composite >= thresholds.composite,
               _score_detail("composite", summary.composite, summary.composite_ci95, policy.gate_on,
                             thresholds.composite))
    held = gated_value(policy.gate_on, summary.held_out, summary.held_out_ci95)
    checks.add("held_out", held is not None and held >= thresholds.held_out,
               _score_detail("held-out", summary.held_out, summary.held_out_ci95, policy.gate_on,
                             thresholds.held_out))
    # Without a champion the base model is what the candidate would replace.
    baseline_tag = evidence.champion_eval_tag or _base_eval_tag(runtime.require_ledger())
    current = read_results(eval_dir(runtime, summary.tag) / RESULTS_FILE)
    baseline: list[ScenarioResult] | None = None
    if baseline_tag is not None and baseline_tag != summary.tag:
        baseline = read_results(eval_dir(runtime, baseline_tag) / RESULTS_FILE)
        if not baseline:
            message = f"the champion's eval {baseline_tag} has no results to compare with"
            checks.add("regressions", False, message)
            checks.add("paired_regression", False, message)
            return
        report = regressions_against(current, baseline, baseline_tag)
    else:
        report = summary.regressions
        if report.baseline_tag is not None and report.baseline_tag != summary.tag:
            baseline = read_results(eval_dir(runtime, report.baseline_tag) / RESULTS_FILE) or None
    against = f"vs {report.baseline_tag}" if report.baseline_tag else "no baseline"
    ids = f": {', '.join(report.scenario_ids[:10])}" if report.scenario_ids else ""
    evidence.extra["regressions"] = {"baseline_tag": report.baseline_tag, "count": report.count,
                                     "compared": report.compared,
                                     "scenario_ids": report.scenario_ids}
    checks.add("regressions", report.count <= policy.max_regressions,
               f"{report.count} of {report.compared} regressed {against} "
               f"(max {policy.max_regressions}){ids}")
    _check_paired(runtime, current, baseline, report.baseline_tag, checks, evidence)


def _check_paired(runtime: ClusterRuntime, current: list[ScenarioResult],
                  baseline: list[ScenarioResult] | None, baseline_tag: str | None, checks: _Checks,
                  evidence: GateEvidence) -> None:
    alpha = runtime.cluster.config.policy.regression_alpha
    before = {r.scenario_id: r for r in by_scenario(baseline or [])}
    now = {r.scenario_id: r for r in by_scenario(current)}
    common = sorted(set(before) & set(now))
    if not common:
        checks.add("paired_regression", True, "no baseline eval on the same scenarios to pair with")
        return
    cfg = runtime.cluster.config.eval
    test = paired_test([(before[s].score, before[s].passed, now[s].score, now[s].passed, now[s].weight)
                        for s in common], resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed)
    evidence.extra["paired"] = test
    evidence.extra["paired_baseline_tag"] = baseline_tag
    facts = (f"vs {baseline_tag} on {test.n}: {test.fixed} fixed, {test.regressed} regressed "
             f"(McNemar p={test.mcnemar_p:.3g}); scores up {test.improved}, down {test.worsened} "
             f"(sign p={test.sign_p:.3g}); mean delta {test.mean_delta:+.3f} "
             f"[{test.delta_ci95[0]:+.3f}, {test.delta_ci95[1]:+.3f}]")
    if alpha <= 0:
        checks.add("paired_regression", True, f"{facts}; off ([policy] regression_alpha = 0)")
        return
    worse = significantly_worse(test, alpha)
    checks.add("paired_regression", not worse,
               f"{facts}: {'significantly worse' if worse else 'not significantly worse'} "
               f"at alpha {alpha:g}")


def _check_training(runtime: ClusterRuntime, ledger: Ledger, candidate: str | None,
                    checks: _Checks, evidence: GateEvidence) -> None:
    if candidate is None:
        checks.add("training_manifest", False, "no candidate adapter")
        checks.add("leakage", False, "no training manifest to check")
        return
    path = runtime.adapter_path(candidate) / TRAINING_MANIFEST
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        checks.add("training_manifest", False, f"no {TRAINING_MANIFEST} in adapters/{candidate}")
        checks.add("leakage", False, "no training manifest to check")
        return
    except ValueError as exc:
        checks.add("training_manifest", False, f"adapters/{candidate}/{TRAINING_MANIFEST}: {exc}")
        checks.add("leakage", False, "no readable training manifest to check")
        return
    digest = sha256_hex(raw)
    evidence.training_manifest = manifest
    evidence.training_manifest_sha256 = digest
    entry = _iteration_entry(ledger, candidate)
    recorded = entry.training_manifest_sha256 if entry else None
    problems = []
    if entry is None:
        problems.append(f"no iteration.advanced entry for {candidate} in the ledger")
    elif recorded is not None and recorded != digest:
        problems.append("its sha256 differs from the ledger's iteration.advanced entry (altered?)")
    if manifest.get("cluster") not in (None, runtime.cluster.name):
        problems.append(f"it is for cluster {manifest.get('cluster')!r}")
    checks.add("training_manifest", not problems,
               "; ".join(problems) if problems else
               f"adapters/{candidate}/{TRAINING_MANIFEST} matches the ledger ({digest[:12]})")
    _check_leakage(runtime, manifest, checks)


def _check_leakage(runtime: ClusterRuntime, manifest: dict[str, Any], checks: _Checks) -> None:
    catalog = runtime.require_catalog()
    leakage = manifest.get("leakage_check")
    own_ok = isinstance(leakage, dict) and leakage.get("ok") is True
    trained = manifest.get("scenarios")
    if not isinstance(trained, list):
        checks.add("leakage", False, "the training manifest lists no training scenarios")
        return
    trained_ids = {str(item.get("id")) for item in trained if isinstance(item, dict)}
    trained_hashes = {str(item.get(key)) for item in trained if isinstance(item, dict)
                      for key in ("hash", "prompt_hash") if item.get(key)}
    held = catalog.held_out.scenarios
    held_ids = {s.id for s in held}
    # Content and prompt hashes both: a held-out prompt copied under a new id is still a leak.
    held_hashes = {scenario_hash(s) for s in held} | {prompt_hash(s) for s in held}
    leaked = sorted(trained_ids & held_ids)
    leaked_hashes = sorted(trained_hashes & held_hashes)
    problems = []
    if not own_ok:
        problems.append("the trainer's own leakage check did not pass")
    if leaked:
        problems.append(f"held-out ids were trained on: {', '.join(leaked[:10])}")
    if leaked_hashes:
        problems.append(f"{len(leaked_hashes)} trained scenario hash(es) are in the held-out set")
    checks.add("leakage", not problems,
               "; ".join(problems) if problems else
               f"none of {len(trained_ids)} training scenarios is among {len(held_ids)} held-out")


def _check_judges(runtime: ClusterRuntime, summary: EvalSummary | None, checks: _Checks,
                  evidence: GateEvidence) -> None:
    from modelsmith.loop.eval.judge_check import judge_gate

    sets = set(summary.scenario_sets) if summary is not None else set()
    scenarios = [s for s in runtime.require_catalog().all() if s.set in sets]
    passed, detail, standing = judge_gate(runtime, scenarios, runtime.judge_models)
    evidence.extra["judges"] = standing
    checks.add("judge_agreement", passed, detail)
