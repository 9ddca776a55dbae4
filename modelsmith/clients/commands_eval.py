"""CLI commands of the eval half of the loop: eval, results, compare, scenarios, ledger."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from modelsmith.clients import commands_scenarios, render
from modelsmith.clients.common import ExitCode, UsageError, call, emit_json
from modelsmith.clients.watch import follow_job
from modelsmith.rpc.schema.evals import (
    EvalComparison,
    EvalResults,
    EvalStarted,
    EvalSummary,
    ScenarioSets,
)


def eval_block(summary: EvalSummary) -> str:
    g = summary.gates
    # The sets it ran on (scenario_sets records every set's version, the synthetic one too).
    ran = {"core": {"core"}, "held_out": {"held-out"}, "synthetic": {"synthetic"}}.get(
        summary.type, {"core", "held-out"})
    sets = ", ".join(sorted(s for s in summary.scenario_sets if s in ran)) or "—"
    kind = "quick, " if summary.quick else ""
    reg = summary.regressions
    lines = [
        render.header("Modelsmith Eval"),
        render.kv("cluster", summary.cluster),
        render.kv("model", summary.model),
        render.kv("iteration", summary.iteration),
        render.kv("engine", summary.engine) if summary.engine else
        render.kv("adapter", summary.adapter or "base"),
        render.kv("tag", summary.tag),
        render.kv("scenarios", f"{summary.scored} ({kind}{summary.type.replace('_', '-')}: {sets})"),
        "",
        render.scored_gate("composite", summary.composite, summary.composite_ci95, g["composite"]),
    ]
    if summary.type != "core":
        lines.append(render.scored_gate("held_out", summary.held_out, summary.held_out_ci95, g["held_out"]))
    if summary.format_score is not None or summary.substance_score is not None:
        lines.append(render.kv("format", render.score(summary.format_score)))
        lines.append(render.kv("substance", render.score(summary.substance_score)))
    if summary.repeats > 1:
        flaky = f"  ({', '.join(summary.flaky[:5])}{', …' if len(summary.flaky) > 5 else ''})" if summary.flaky else ""
        lines.append(render.kv("trials", f"{summary.repeats} per scenario"))
        lines.append(render.kv(f"pass^{summary.repeats}", render.score(summary.pass_at_k)))
        lines.append(render.kv("flaky", f"{len(summary.flaky)}{flaky}"))
    lines.append(render.kv("regressions", f"{reg.count} / {reg.compared}"
                           + (f"  (vs {reg.baseline_tag})" if reg.baseline_tag else "")))
    if summary.latency_p50_s is not None:
        lines.append(render.kv("latency", f"p50 {summary.latency_p50_s:.3f} s, "
                               f"p95 {summary.latency_p95_s or 0:.3f} s"))
    if summary.tokens_per_s is not None:
        lines.append(render.kv("tokens/s", f"{summary.tokens_per_s:.1f}"))
    if summary.cost_per_1k_scenarios_usd is not None:
        lines.append(render.kv("cost / 1k", f"${summary.cost_per_1k_scenarios_usd:.4f}"))
    if summary.judge_errors:
        lines.append(render.kv("judge errors", summary.judge_errors))
    lines.append(render.kv("duration", render.duration(summary.duration_s)))
    lines.append(render.kv("result", "PASS" if summary.passed else "FAIL"))
    return "\n".join(lines) + "\n"


def cmd_eval(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"cluster": args.cluster, "type": args.type, "quick": args.quick}
    for key in ("tag", "workers", "domain", "adapter", "engine", "repeats", "temperature"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    started = call(args, "eval.run", params, EvalStarted)
    if args.no_wait:
        emit_json(started) if args.json else print(f"eval job {started.job_id} started: {started.tag}")
        return ExitCode.OK
    job = follow_job(args.socket, started.job_id, timeout=None)
    if job.state != "succeeded":
        err = job.error or {}
        if args.json:
            emit_json({"job": job})
        print(f"modelsmith: eval {started.tag} {job.state}: {err.get('message', '')}", file=sys.stderr)
        return ExitCode.JOB_FAILED
    summary = call(args, "eval.summary", {"cluster": args.cluster, "tag": started.tag}, EvalSummary)
    if args.json:
        emit_json(summary)
    else:
        sys.stdout.write(eval_block(summary))
    return ExitCode.OK if summary.passed else ExitCode.GATE_FAILED


def cmd_results(args: argparse.Namespace) -> int:
    result = call(args, "eval.results", {"cluster": args.cluster, "tag": args.tag, "failed_only": not args.all,
                                         "offset": args.offset, "limit": args.limit}, EvalResults)
    if args.json:
        emit_json(result)
        return ExitCode.OK
    print(f"\n  {result.total} {'results' if args.all else 'failed scenarios'} in {args.tag}\n")
    for r in result.results:
        print(f"  {r.scenario_id}  [{r.set}]  score {r.score:.3f}  {'PASS' if r.passed else 'FAIL'}")
        for c in r.criteria:
            mark = "ok " if c.passed else "x  "
            print(f"      {mark}{c.type:<13}{c.score:.2f}  {c.error_kind or ''}  {c.detail}")
        print(f"      response:  {_clip(r.response)}")
        print(f"      reference: {_clip(r.reference or '')}\n")
    return ExitCode.OK


def _clip(text: str, n: int = 100) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= n else text[: n - 1] + "…"


def cmd_compare(args: argparse.Namespace) -> int:
    result = call(args, "eval.compare", {"cluster": args.cluster, "a": args.a, "b": args.b}, EvalComparison)
    if args.json:
        emit_json(result)
        return ExitCode.OK
    print(render.header(f"Compare {args.a} → {args.b}"))
    print(render.kv("composite", f"{result.composite_a:.3f} → {result.composite_b:.3f}  ({result.composite_delta:+.3f})"))
    if result.held_out_a is not None and result.held_out_b is not None:
        print(render.kv("held_out", f"{result.held_out_a:.3f} → {result.held_out_b:.3f}"))
    for label, a, b, delta in (("format", result.format_a, result.format_b, result.format_delta),
                               ("substance", result.substance_a, result.substance_b, result.substance_delta)):
        if a is not None or b is not None:
            shown = f"  ({delta:+.3f})" if delta is not None else ""
            print(render.kv(label, f"{render.score(a)} → {render.score(b)}{shown}"))
    print(render.kv("fixed", result.fixed))
    print(render.kv("regressed", result.regressed))
    print(render.kv("unchanged", result.unchanged))
    if result.paired is not None:
        t = result.paired
        print(render.kv("McNemar", f"p={t.mcnemar_p:.3g}  ({t.fixed} fixed, {t.regressed} regressed of {t.n})"))
        print(render.kv("sign test", f"p={t.sign_p:.3g}  ({t.improved} up, {t.worsened} down)"))
        print(render.kv("mean delta", f"{t.mean_delta:+.3f}  {render.interval(t.delta_ci95, signed=True)}"))
    changed = [s for s in result.scenarios if s.status in ("fixed", "regressed")]
    if changed:
        print()
        sys.stdout.write(render.table([(s.scenario_id, s.set, s.status, f"{s.score_a:.2f}", f"{s.score_b:.2f}",
                                        f"{s.delta:+.2f}") for s in changed],
                                      ["scenario", "set", "status", "a", "b", "delta"]))
    return ExitCode.OK


def cmd_scenarios(args: argparse.Namespace) -> int:
    if args.action in commands_scenarios.ACTIONS:
        return commands_scenarios.ACTIONS[args.action](args)
    if not args.cluster:
        raise UsageError(f"scenarios {args.action} needs --cluster")
    method = "scenarios.verify" if args.action == "verify" else "scenarios.list"
    result = call(args, method, {"cluster": args.cluster}, ScenarioSets)
    if args.json:
        emit_json(result)
    else:
        rows = [(s.name, s.count, s.version[:16], "yes" if s.recorded_version == s.version else "no")
                for s in result.sets]
        sys.stdout.write(render.table(rows, ["set", "scenarios", "version", "in ledger"]))
        if result.changed:
            print(f"  new set versions recorded: {', '.join(result.changed)}")
        if result.error:
            print(f"  error: {result.error['message']}", file=sys.stderr)
    return ExitCode.OK if result.ok else ExitCode.REFUSED


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    """Runs locally on the files (works with the daemon down)."""
    from modelsmith.errors import LedgerCorrupt, ModelsmithError, NotFound, error_envelope
    from modelsmith.loop.cluster.recovery import records_without_ledger
    from modelsmith.loop.promotion.record_files import verify_cluster_records
    from modelsmith.loop.records.ledger import verify_file
    from modelsmith.rpc.address import resolve_home

    home = resolve_home(args.home)
    if not home.is_dir():
        raise NotFound(f"no Modelsmith home at {home}", data={"home": str(home)})
    clusters = ([home / args.cluster] if args.cluster else
                sorted({p.parent for p in (*home.glob("*/ledger.jsonl"), *home.glob("*/cluster.toml"))}))
    reports: list[dict[str, Any]] = []
    ok = True
    for root in clusters:
        path = root / "ledger.jsonl"
        orphans = [] if path.exists() else records_without_ledger(root)
        try:
            if orphans:
                raise LedgerCorrupt(f"ledger.jsonl is missing but {len(orphans)} record(s) need it "
                                    f"(e.g. {orphans[0]})",
                                    data={"file": str(path), "records": orphans[:20]})
            if not path.exists():  # a cluster that has not started yet: nothing to vouch for
                reports.append({"cluster": root.name, "ok": True, "entries": 0, "torn_tail": False,
                                "problem": None, "detail": None})
                continue
            report = verify_file(path)
            entry: dict[str, Any] = {
                "cluster": root.name, "ok": report.ok, "entries": report.entries,
                "torn_tail": report.torn_tail is not None,
                "problem": (report.problem or {}).get("reason") if report.problem else None,
                "detail": report.problem,
            }
        except ModelsmithError as exc:
            error = error_envelope(exc)
            entry = {"cluster": root.name, "ok": False, "entries": None, "torn_tail": False,
                     "problem": error["message"], "code": error["code"], "data": error["data"]}
        records = verify_cluster_records(root)
        if records:
            entry["ok"] = False
            entry["records"] = records
        ok = ok and entry["ok"]
        reports.append(entry)
    if args.json:
        emit_json({"ok": ok, "clusters": reports})
    else:
        for r in reports:
            state = "OK" if r["ok"] else "FAILED"
            print(f"  {r['cluster']:<24} {state:<7} entries={r['entries']}  {r.get('problem') or ''}")
            for problem in r.get("records", []):
                print(f"      {problem}")
        if not reports:
            print(f"  no ledgers under {home}")
    return ExitCode.OK if ok else ExitCode.GATE_FAILED


def register(sub: Any, add: Any) -> None:
    p = add("eval", cmd_eval, "run an eval of a cluster's governed scenario set (exit 0 pass, 1 fail)")
    p.add_argument("--cluster", required=True, help="the cluster to evaluate")
    p.add_argument("--type", choices=["core", "held_out", "full", "synthetic"], default="full",
                   help="which scenario sets: core, held_out or both (default: full); "
                        "synthetic: the synthetic set alone, never the gate's evidence")
    p.add_argument("--quick", action="store_true", help="a deterministic stratified subset")
    p.add_argument("--tag", help="name of this eval (default: the daemon picks one)")
    p.add_argument("--workers", type=int, help="concurrent requests for this eval (default: the "
                   "engine's max_concurrency for a named engine, else all at once)")
    p.add_argument("--engine", help="a named engine of modelsmith.toml ([engines.NAME]) to run "
                   "the cluster's governed set on, for comparison (never a promotion candidate)")
    p.add_argument("--domain", help="only scenarios of this domain")
    p.add_argument("--adapter", help="base | champion | candidate | iter-N (default: newest)")
    p.add_argument("--repeats", type=int, help="sample each scenario K times: pass rates, flaky "
                   "scenarios, pass^K (default: 1)")
    p.add_argument("--temperature", type=float, help="eval sampling temperature (default: "
                   "[sampling] temperature of cluster.toml)")
    p.add_argument("--no-wait", action="store_true", help="return the job id at once")

    p = add("results", cmd_results, "failed scenarios of an eval with rubric breakdowns")
    p.add_argument("tag", help="the eval's tag")
    p.add_argument("--cluster", required=True, help="the cluster the eval belongs to")
    p.add_argument("--all", action="store_true", help="all results, not only failures")
    p.add_argument("--offset", type=int, default=0, help="skip this many results (default: 0)")
    p.add_argument("--limit", type=int, default=20, help="show at most this many results (default: 20)")

    p = add("compare", cmd_compare, "fixed / regressed / unchanged between two evals")
    p.add_argument("a", help="tag of the earlier eval")
    p.add_argument("b", help="tag of the later eval")
    p.add_argument("--cluster", required=True, help="the cluster both evals belong to")

    p = add("scenarios", cmd_scenarios, "governed scenario sets: list, verify, "
            + ", ".join(commands_scenarios.ACTIONS))
    p.add_argument("action", choices=["list", "verify", *commands_scenarios.ACTIONS],
                   help="list the sets, or verify their hashes; accept: synthetic into core")
    p.add_argument("--cluster", help="the cluster whose sets to read")
    commands_scenarios.add_arguments(p)

    p = add("ledger", cmd_ledger_verify, "verify ledgers (hash chain, signed records); works offline")
    p.add_argument("action", choices=["verify"], help="verify (the only action)")
    p.add_argument("--cluster", help="only this cluster (default: every cluster of the home)")
    p.add_argument("--home", help="state root (default: $MODELSMITH_HOME or ./.iterate)")
